"""Samples per second of one training step (forward + backward + AdamW) on this CPU: the splat
encoder against the RGB encoder on the same open_clip backbone. The splat encoder feeds the ViT
`latents` tokens instead of the RGB tower's patches (196 for ViT-B-16 at 224px): 49, and 196 as in
the paper, but adds the stem and resampler over the N Gaussians."""

import argparse
import time

import torch

from splatclip.models.gsclip import from_open_clip
from splatclip.models.losses import clip_loss
from splatclip.platform.specs import ModelSpec



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
    print(f"{'backbone':<10} {'encoder':<7} {'latents':>7} {'trainable':>9} {'s/step':>8} {'samples/s':>10}")
    for name, size, latent_counts, repeats in (("demo-vit", 28, (16,), 5), ("ViT-B-16", 224, (49, 196), 2)):
        times = {}
        for kind, latents in [("rgb", 0)] + [("splat", n) for n in latent_counts]:
            torch.manual_seed(0)
            spec = ModelSpec(encoder=kind, latents=max(latents, 1), resampler_layers=4)
            model = from_open_clip(name, spec=spec)
            times[latents] = step_time(model, args.batch, args.gaussians, size, repeats)
            shown = str(latents) if kind == "splat" else "-"
            print(f"{name:<10} {kind:<7} {shown:>7} {model.trainable_share():>8.1%} {times[latents]:>8.3f} "
                  f"{args.batch / times[latents]:>10.1f}")
        for n in latent_counts:
            print(f"{'':<10} splat ({n} latents) / rgb step time: {times[n] / times[0]:.2f}x")


if __name__ == "__main__":
    main()
