"""Samples per second of one training step (forward + backward + AdamW) on this CPU: the splat
encoder against the RGB encoder on the same open_clip backbone. The splat encoder feeds the ViT
`latents` tokens (49 here) instead of the RGB tower's patches (196 for ViT-B-16 at 224px), but adds
the stem and resampler over the N Gaussians."""

import argparse
import time

import torch

from splatclip.models.gsclip import from_open_clip
from splatclip.models.losses import clip_loss
from splatclip.platform.specs import ModelSpec

TINY = "splatclip/models/configs/demo-vit.json"


def step_time(model, batch, gaussians, image_size, repeats):
    params = torch.rand(batch, gaussians, 8)
    params[..., 2:5] = 0.02
    images = torch.rand(batch, 3, image_size, image_size)
    tokens = model.tokenizer(["a photo of a thing"] * batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        feats = model.encode_splats(params) if model.kind == "splat" else model.encode_image(images)
        loss = clip_loss(feats, model.encode_text(tokens), model.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gaussians", type=int, default=400)
    args = ap.parse_args()
    print(f"batch {args.batch}, {args.gaussians} Gaussians per image, {torch.get_num_threads()} threads")
    print(f"{'backbone':<10} {'encoder':<7} {'trainable':>9} {'s/step':>8} {'samples/s':>10}")
    for name, latents, repeats in ((TINY, 16, 5), ("ViT-B-16", 49, 2)):
        size = 32 if name == TINY else 224
        rows = {}
        for kind in ("splat", "rgb"):
            torch.manual_seed(0)
            model = from_open_clip(name, spec=ModelSpec(encoder=kind, latents=latents, resampler_layers=4))
            seconds = step_time(model, args.batch, args.gaussians, size, repeats)
            rows[kind] = seconds
            label = "demo-vit" if name == TINY else name
            print(f"{label:<10} {kind:<7} {model.trainable_share():>8.1%} {seconds:>8.3f} {args.batch / seconds:>10.1f}")
        print(f"{'':<10} splat/rgb step time: {rows['splat'] / rows['rgb']:.2f}x")


if __name__ == "__main__":
    main()
