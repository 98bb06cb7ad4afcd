"""The Triton rasterizer's kernels against the hardware, at the paper's workload (N=400, 224x224).

1. Resources: each kernel compiled ahead of time for sm_80 and sm_90 (registers, spills, occupancy;
   `splatclip.cuda.kernel_resources`). Needs no GPU.
2. Work: FLOPs and bytes per kernel for one forward and one backward at batch 1,024 and 4,096, counted
   from the (Gaussian, tile) pairs of structured-init splats of four real photos, and the floor this
   sets on an A100, H100 and H200: ms per optimizer step and ms per image for a 2,000-iteration fit.
3. Timings of what this machine can run: on a CUDA machine triton, torch and gsplat at batch 1 and
   1,024 (ms per fitting step and ms per image for a 2,000-iteration fit, from the measured step);
   on a CPU the tiled torch renderer (eager and fused) at batch 1 and 8.

    python benchmarks/kernels.py          # make gpu-check runs it on a GPU machine
"""

import argparse
import time

import torch
from skimage import data

from splatclip.cuda import render
from splatclip.cuda.binning import bin_gaussians
from splatclip.cuda.contract import TILE
from splatclip.cuda.kernel_resources import resources, table
from splatclip.fitting.images import clip_crop
from splatclip.fitting.init import structured_init

GPUS = {"A100": (2.04e12, 19.5e12), "H100": (3.35e12, 67e12), "H200": (4.8e12, 67e12)}  # SXM: bytes/s, fp32 FLOP/s
# FLOPs per (pair, pixel), an FMA counted as 2 and exp as 8 (the SFU issues 16 a clock per SM against
# 128 FP32 lanes). Forward: z1 2, z2 4, q 4, cut-off test 1, exp 8, select 1, three color FMAs 6 = 26.
# Backward: the forward's recompute without the colors 20, gw 5, gq 1, gz2 1, gz1 3, eight sums with
# their products 14 = 44.
FLOPS = {"render_fwd": 26, "render_bwd": 44}
PAIR_BYTES = {"render_fwd": 4 + 32, "render_bwd": 4 + 32 + 32}  # index, 8 params read (+ 8 atomic adds)
PIXEL_BYTES = 12  # the forward writes 3 floats a pixel, the backward reads 3 upstream gradients
FIT_ITERATIONS = 2000
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def work(pairs_per_image: float, batch: int, size: int) -> dict:
    """{kernel: (FLOPs, bytes)} for one launch over `batch` images."""
    tiles = batch * (-(-size // TILE)) ** 2
    pairs = pairs_per_image * batch
    return {k: (pairs * TILE * TILE * FLOPS[k], pairs * PAIR_BYTES[k] + tiles * (8 + TILE * TILE * PIXEL_BYTES))
            for k in FLOPS}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit_step_seconds(images, backend: str, fused: bool, steps: int) -> float:
    """Seconds per Adam step of the fitting loss (render, MSE, backward, update) over the batch."""
    size = images.shape[-1]
    p = structured_init(images, 400, backend="torch" if backend == "gsplat" else backend).detach().requires_grad_()
    opt = torch.optim.Adam([p], lr=1e-3)

    def step():
        opt.zero_grad()
        ((render(p, size, size, backend=backend, compile=fused) - images) ** 2).mean().backward()
        opt.step()

    step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="timed fitting steps per row")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"

    print("1. resources, compiled ahead of time (no GPU needed)")
    print(table(resources()))

    photos = torch.stack([clip_crop(getattr(data, n)(), args.size) for n in PHOTOS])
    params = structured_init(photos, args.gaussians, backend="torch")
    pairs_per_image = bin_gaussians(params, args.size, args.size).key.numel() / len(PHOTOS)
    print(f"\n2. work at N={args.gaussians}, {args.size}x{args.size}: {pairs_per_image:.0f} (Gaussian, tile) pairs "
          f"per image (structured init of {', '.join(PHOTOS)}); floor = max(FLOPs / peak, bytes / bandwidth)")
    gpus = list(GPUS)
    print(f"{'kernel':<11} {'batch':>5} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>7} " +
          " ".join(f"{g + ' ms':>9}" for g in gpus))
    fit_floor = {}
    for batch in (1024, 4096):
        for kernel, (flops, nbytes) in work(pairs_per_image, batch, args.size).items():
            floors = [max(flops / peak, nbytes / bw) for bw, peak in GPUS.values()]
            for g, f in zip(gpus, floors):
                fit_floor[g, batch] = fit_floor.get((g, batch), 0.0) + f
            print(f"{kernel:<11} {batch:>5} {flops / 1e9:>8.1f} {nbytes / 1e6:>8.1f} {flops / nbytes:>7.1f} " +
                  " ".join(f"{f * 1e3:>9.3f}" for f in floors))
    for batch in (1024, 4096):
        print(f"floor of a {FIT_ITERATIONS}-iteration fit at batch {batch}, ms per image: " +
              ", ".join(f"{g} {fit_floor[g, batch] * FIT_ITERATIONS / batch * 1e3:.3f}" for g in gpus))

    rows = [("triton", False), ("torch", False), ("gsplat", False)] if cuda else [("torch", False), ("torch", True)]
    batches = (1, 1024) if cuda else (1, 8)
    print(f"\n3. measured on this machine ({torch.cuda.get_device_name() if cuda else 'CPU'}): "
          f"fitting steps at N={args.gaussians}, {args.size}x{args.size}, {args.steps} timed steps per row")
    print(f"{'backend':<16} {'batch':>5} {'ms/step':>9} {'ms/image-step':>14} {f'ms/image ({FIT_ITERATIONS} its)':>20}")
    for backend, fused in rows:
        for batch in batches:
            images = torch.stack([photos[i % len(PHOTOS)] for i in range(batch)]).to(device)
            name = backend + (" (fused)" if fused else "")
            try:
                seconds = fit_step_seconds(images, backend, fused, args.steps)
            except Exception as exc:  # a backend that cannot run here (gsplat's JIT build) is reported, not fatal
                print(f"{name:<16} {batch:>5} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                break
            print(f"{name:<16} {batch:>5} {seconds * 1e3:>9.2f} {seconds / batch * 1e3:>14.3f} "
                  f"{seconds / batch * FIT_ITERATIONS * 1e3:>20.1f}", flush=True)


if __name__ == "__main__":
    main()
