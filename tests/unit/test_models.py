"""GS-CLIP on open_clip: masks, permutation invariance, freezing, checkpoints, losses, zero-shot."""

import os
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splatclip.models.gsclip import from_open_clip
from splatclip.models.losses import clip_loss, distill_loss
from splatclip.models.zeroshot import class_embeddings, load_templates, topk_correct
from splatclip.platform.runtime import free_port
from splatclip.platform.specs import ModelSpec

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny-vit.json")
SMALL = ModelSpec(latents=8, resampler_layers=2, resampler_width=32, fourier_bands=4)


def tiny(**kw):
    torch.manual_seed(0)
    return from_open_clip(TINY, spec=SMALL.model_copy(update=kw))


def splat_batch(B=3, N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, N, 8, generator=g)
    p[..., 2:5] = 0.01 + 0.05 * p[..., 2:5]
    return p


def test_padding_permutation_and_pruned_gaussians_do_not_matter():
    model = tiny().eval()
    p = splat_batch(2, 20)
    with torch.no_grad():
        base = model.encode_splats(p)
        padded = torch.cat([p, torch.rand(2, 13, 8)], 1)
        mask = torch.cat([torch.ones(2, 20, dtype=torch.bool), torch.zeros(2, 13, dtype=torch.bool)], 1)
        torch.testing.assert_close(model.encode_splats(padded, mask), base, atol=1e-5, rtol=1e-5)
        perm = torch.randperm(20)
        torch.testing.assert_close(model.encode_splats(p[:, perm]), base, atol=1e-5, rtol=1e-5)
        pruned = p.clone()
        pruned[:, 5:, 5:8] = 0.0  # the fitter zeroes pruned colors and masks them out
        live = torch.ones(2, 20, dtype=torch.bool)
        live[:, 5:] = False
        torch.testing.assert_close(model.encode_splats(pruned, live), model.encode_splats(p[:, :5]), atol=1e-5, rtol=1e-5)


def test_only_intended_parameters_change():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = model.tokenizer(["a photo", "a digit", "a cat"])
    loss = clip_loss(model.encode_splats(splat_batch()), model.encode_text(tokens), model.logit_scale)
    loss.backward()
    opt.step()
    trainable = model.trainable_names(0)
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"frozen {n} changed"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("splat.stem.") for n in changed) and "clip.visual.proj" in changed
    assert not any(n.startswith("clip.transformer.") for n in changed)  # the text tower stays frozen


def test_unfrozen_blocks_and_trainable_share():
    model = tiny()
    share0 = model.trainable_share()
    share1 = model.set_trainable(1)
    assert 0 < share0 < share1 < 1
    assert all(p.requires_grad for p in model.clip.visual.transformer.resblocks[0].parameters())
    assert not any(p.requires_grad for p in model.clip.visual.transformer.resblocks[1].parameters())


def test_vit_b16_trainable_share_is_reported():
    model = from_open_clip("ViT-B-16")  # pretrained=None: random weights, nothing downloaded
    share = model.trainable_share()
    assert 0.05 < share < 0.09  # the paper: about 7%
    assert 0.12 < model.set_trainable(2) < 0.2


def test_tiny_forward_backward_reaches_only_the_trainable_parts():
    model = tiny()
    p = splat_batch(8, 400)
    tokens = model.tokenizer(["x"] * 8)
    loss = clip_loss(model.encode_splats(p), model.encode_text(tokens), model.logit_scale)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("splat"))
    assert all(grads[n] is None for n, param in model.named_parameters() if not param.requires_grad)


def test_rgb_encoder_trains_everything():
    model = tiny(encoder="rgb")
    assert model.splat is None and model.trainable_share() == 1.0
    out = model.encode_image(torch.rand(2, 3, 48, 48))
    assert out.shape == (2, 64)


def test_pretrained_checkpoint_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = open_clip.create_model(open_clip.add_model_config(TINY) or "tiny-vit")
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    model = from_open_clip(TINY, pretrained=str(path), spec=SMALL)
    for name, weight in source.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], weight), name
    # the checkpoint of a trained splat encoder leaves the frozen backbone out
    state = model.trainable_state()
    assert any(k.startswith("splat.") for k in state)
    assert not any(k.startswith("clip.transformer.") or k == "clip.token_embedding.weight" for k in state)


def test_distill_loss():
    t = torch.randn(4, 16)
    assert distill_loss(3 * t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_loss(-t, t).item() == pytest.approx(4.0 / 16, rel=1e-5)


def _ddp_worker(rank, world, port, img, txt, scale, ids, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = len(img) // world
    i = img[rank * b : (rank + 1) * b].clone().requires_grad_()
    t = txt[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss = clip_loss(i, t, scale, None if ids is None else ids[rank * b : (rank + 1) * b])
    loss.backward()
    torch.save({"loss": loss.detach(), "gi": i.grad, "gt": t.grad}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("ids", [None, torch.tensor([7, 1, 2, 7, 3, 1, 9, 7])], ids=["distinct", "repeated"])
def test_contrastive_loss_across_two_processes_equals_single_process(tmp_path, ids):
    """Repeated captions (7 and 1) span both ranks: the positives must be found in the global batch."""
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    single = clip_loss(i, t, 10.0, ids)
    single.backward()
    mp.spawn(_ddp_worker, args=(2, free_port(), img, txt, 10.0, ids, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r["loss"], single.detach())
        torch.testing.assert_close(r["gi"], i.grad[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(r["gt"], t.grad[rank * 4 : (rank + 1) * 4])


def test_contrastive_loss_counts_repeated_captions_as_positives():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    distinct = torch.tensor([10, 11, 12, 13, 14])
    torch.testing.assert_close(clip_loss(img, txt, 5.0, distinct), clip_loss(img, txt, 5.0))
    ids = torch.tensor([4, 2, 4, 4, 3])  # images 0, 2, 3 share a caption
    logits = 5.0 * img @ txt.t()
    by_hand = 0.0
    for a in (logits, logits.t()):
        logp = a.log_softmax(1)
        for r in range(5):
            positives = [c for c in range(5) if ids[c] == ids[r]]
            by_hand -= sum(logp[r, c] for c in positives) / len(positives) / 5
    torch.testing.assert_close(clip_loss(img, txt, 5.0, ids), by_hand / 2)
    # a batch of one caption only: every text is right for every image, nothing to contrast
    same = torch.zeros(5, dtype=torch.long)
    uniform = -(logits.log_softmax(1).mean() + logits.t().log_softmax(1).mean()) / 2
    torch.testing.assert_close(clip_loss(img, txt, 5.0, same), uniform)


def test_zero_shot_classifier(tmp_path):
    model = tiny().eval()
    (tmp_path / "t.json").write_text('["a photo of a {c}.", "a drawing of a {c}."]')
    templates = load_templates(str(tmp_path / "t.json"))
    assert templates[1]("cat") == "a drawing of a cat."
    classes = ["cat", "dog", "digit"]
    emb = class_embeddings(model.encode_text, model.tokenizer, classes, templates)
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # images equal to a class embedding are classified as that class
    hits = topk_correct(emb[[2, 0, 1]], emb, torch.tensor([2, 0, 0]), ks=(1, 2))
    assert hits[1] == 2 and hits[2] >= 2
    assert len(load_templates("imagenet")) == 80
