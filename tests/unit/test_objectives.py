"""The objectives a stage names: looked up by name, checked against the spec, the losses they stand for."""

import torch

from splatclip.models.gsclip import from_open_clip
from splatclip.models.losses import clip_loss, distill_loss
from splatclip.models.objectives import OBJECTIVES, Objective, register, stage_problems
from splatclip.platform.specs import ModelSpec


def test_a_spec_names_known_objectives_for_its_encoder():
    assert stage_problems(["distill", "contrastive"], "splat", True) == []
    assert stage_problems(["contrastive"], "rgb", False) == []
    assert stage_problems(["distill"], "rgb", False) == ["stages.0.kind: distill trains the splat encoder, not rgb"]
    assert stage_problems(["contrastive", "diffusion"], "splat", False) == [
        "stages.1.kind: 'diffusion' is no objective (known: contrastive, distill)"]
    assert stage_problems(["contrastive"], "splat", True) == [
        "images: no stage reads the source images (objectives that do: distill)"]


def test_a_new_objective_is_one_registered_class():
    @register
    class Alignment(Objective):
        name = "alignment_test"

        def __call__(self, model, batch, device):
            return (model.encode_splats(batch["params"], batch["mask"]) - 1).square().mean()

    try:
        assert stage_problems(["distill", "alignment_test"], "splat", False) == []
        assert OBJECTIVES["alignment_test"] is Alignment and not Alignment.global_batch
    finally:
        del OBJECTIVES["alignment_test"]


def batch(b=4, n=12, dim=None):
    g = torch.Generator().manual_seed(0)
    params = torch.rand(b, n, 8, generator=g)
    params[..., 2:5] = 0.05
    out = {"params": params, "mask": torch.ones(b, n, dtype=torch.bool), "positive_ids": torch.tensor([0, 1, 0, 2])}
    if dim:
        out["teacher"] = torch.randn(b, dim, generator=g)
    return out


def test_the_objectives_are_the_losses_they_name():
    torch.manual_seed(0)
    model = from_open_clip("demo-vit", None, ModelSpec(name="demo-vit", latents=4, resampler_layers=1,
                                                      resampler_width=32, fourier_bands=2))
    model.eval()
    cpu = torch.device("cpu")
    data = batch(dim=model.clip.visual.output_dim)
    data["tokens"] = model.tokenizer(["a", "b", "a", "c"])
    with torch.no_grad():
        want = distill_loss(model.splat_features(data["params"], data["mask"]), data["teacher"])
        assert torch.allclose(OBJECTIVES["distill"]()(model, data, cpu), want)
        want = clip_loss(model.encode_splats(data["params"], data["mask"]), model.encode_text(data["tokens"]),
                         model.logit_scale, data["positive_ids"])
        assert torch.allclose(OBJECTIVES["contrastive"]()(model, data, cpu), want)
    assert OBJECTIVES["contrastive"].global_batch and not OBJECTIVES["distill"].global_batch
