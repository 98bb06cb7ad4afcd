"""Samples per second of one training step (forward + backward + AdamW) on this CPU: the splat
encoder against the RGB encoder on the same open_clip backbone. The splat encoder feeds the ViT
`latents` tokens instead of the RGB tower's patches (196 for ViT-B-16 at 224px): 49, and 196 as in
the paper, but adds the stem and resampler over the N Gaussians.

Each step draws its batch from the trainer's own ingest (`Ingest.batches`, 2 loader processes) over
shards written here (random valid splats; random 8-bit images as PNG), and the `data_wait_fraction`
column is the share of the step's time spent waiting for it.
"""

import argparse
import io
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from splatclip import splats
from splatclip.models.gsclip import from_open_clip
from splatclip.models.objectives import OBJECTIVES
from splatclip.train.ingest import Ingest
from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, WorkerShare
from splatclip.platform.shards import write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import ModelSpec, TrainSpec

SAMPLES = 256


def write_data(directory: str, gaussians: int, size: int) -> tuple[str, str]:
    """A splat shard and an image shard of SAMPLES captioned samples."""
    rng = np.random.default_rng(0)
    splat_url, image_url = f"{directory}/splats-{size}.tar", f"{directory}/images-{size}.tar"
    with write_shard(splat_url) as ws, write_shard(image_url) as wi:
        for i in range(SAMPLES):
            a = np.empty((gaussians, 8), np.float16)
            a[:, 0:2], a[:, 2:5], a[:, 5:8] = rng.uniform(0, 1, (gaussians, 2)), 0.02, rng.uniform(0, 1, (gaussians, 3))
            caption = f"a photo of thing {i}".encode()
            ws.write({"__key__": f"k{i}", "splats.npy": splats.to_bytes(a), "txt": caption})
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(png, format="PNG")
            wi.write({"__key__": f"k{i}", "png": png.getvalue(), "txt": caption})
    return splat_url, image_url


def step_time(model, url: str, batch: int, size: int, repeats: int) -> tuple[float, float]:
    """(seconds per step, fraction of it spent waiting for the batch)."""
    spec = load_spec(TrainSpec, None, [f"data={url}", f"batch_size={batch}", f"model.encoder={model.encoder}"])
    shards = ShardSet((url,), counts={url: SAMPLES})
    fmt = SampleFormat(encoder=model.encoder, image_size=size)
    data = Ingest(spec, shards, fmt, WorkerShare(), model.tokenizer).batches((0, 0), Skipped())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as the train loop's
    contrastive = OBJECTIVES["contrastive"]()  # the train loop's own objective

    def step():
        began = time.perf_counter()
        _, _, b = next(data)
        waited = time.perf_counter() - began
        contrastive(model, b, torch.device("cpu")).backward()
        opt.step()
        opt.zero_grad()
        return waited

    step()  # the loaders' start and the first batch are not counted
    start, waited = time.perf_counter(), 0.0
    for _ in range(repeats):
        waited += step()
    seconds = time.perf_counter() - start
    return seconds / repeats, waited / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gaussians", type=int, default=400)
    args = ap.parse_args()
    print(f"batch {args.batch}, {args.gaussians} Gaussians per image, {torch.get_num_threads()} threads, "
          f"2 loader processes")
    print(f"{'backbone':<10} {'encoder':<7} {'latents':>7} {'trainable':>9} {'s/step':>8} {'samples/s':>10} "
          f"{'data_wait_fraction':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, latent_counts, repeats in (("demo-vit", 28, (16,), 5), ("ViT-B-16", 224, (49, 196), 2)):
            splat_url, image_url = write_data(tmp, args.gaussians, size)
            times = {}
            for kind, latents in [("rgb", 0)] + [("splat", n) for n in latent_counts]:
                torch.manual_seed(0)
                spec = ModelSpec(encoder=kind, latents=max(latents, 1), resampler_layers=4)
                model = from_open_clip(name, spec=spec)
                url = splat_url if kind == "splat" else image_url
                times[latents], wait = step_time(model, url, args.batch, size, repeats)
                shown = str(latents) if kind == "splat" else "-"
                print(f"{name:<10} {kind:<7} {shown:>7} {model.trainable_share():>8.1%} {times[latents]:>8.3f} "
                      f"{args.batch / times[latents]:>10.1f} {wait:>18.3f}", flush=True)
            for n in latent_counts:
                print(f"{'':<10} splat ({n} latents) / rgb step time: {times[n] / times[0]:.2f}x")


if __name__ == "__main__":
    main()
