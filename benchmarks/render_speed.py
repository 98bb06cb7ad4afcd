"""Renderer speed on this CPU: forward+backward of the dense reference vs the tiled renderer (eager
and with its kernels compiled for this CPU, splatclip.cuda.aot), then fitting throughput at 400 Gaussians for batch 1 vs batch 16.
All rows are measured in one run so the ratios are comparable.
"""

import argparse
import time

import torch
from skimage import data

from splatclip.cuda import render
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop
from splatclip.fitting.init import structured_init
from splatclip.platform.specs import FitParams


def fwd_bwd(params, size, backend, compile, repeats):
    p = params.clone().requires_grad_()
    render(p, size, size, backend=backend, compile=compile).square().sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        render(p, size, size, backend=backend, compile=compile).square().sum().backward()
    return (time.perf_counter() - start) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--gaussians", default="400,3136")
    ap.add_argument("--fit-iterations", type=int, default=30)
    args = ap.parse_args()
    photos = ["astronaut", "coffee", "chelsea", "rocket"]
    images = torch.stack([clip_crop(getattr(data, photos[i % 4])(), args.size) for i in range(16)])
    print(f"forward+backward, B={args.batch}, {args.size}x{args.size}, structured-init splats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'N':>5} {'dense s':>8} {'tiled s':>8} {'fused s':>8} {'tiled/dense':>12} {'fused/dense':>12}")
    for n in [int(x) for x in args.gaussians.split(",")]:
        params = structured_init(images[: args.batch], n, backend="torch").detach()
        dense = fwd_bwd(params, args.size, "torch-dense", False, 1)
        tiled = fwd_bwd(params, args.size, "torch", False, 3)
        fused = fwd_bwd(params, args.size, "torch", True, 3)
        print(f"{n:>5} {dense:>8.3f} {tiled:>8.3f} {fused:>8.3f} {dense / tiled:>11.1f}x {dense / fused:>11.1f}x",
              flush=True)

    print(f"\nfitting throughput, 400 Gaussians, {args.size}x{args.size}, {args.fit_iterations} iterations, fused")
    print(f"{'batch':>5} {'s/step':>8} {'images/s':>9} {'img-steps/s':>12}")
    fit_batch(images[:1], FitParams(gaussians=400, iterations=2, size=args.size))  # loads the compiled kernels
    for b in (1, 16):
        cfg = FitParams(gaussians=400, iterations=args.fit_iterations, size=args.size)
        start = time.perf_counter()
        fit_batch(images[:b], cfg)
        total = time.perf_counter() - start
        step = total / args.fit_iterations
        print(f"{b:>5} {step:>8.3f} {b / total:>9.3f} {b / step:>12.1f}  "
              f"(an image needs {args.fit_iterations} steps here; 2000 in the paper)", flush=True)


if __name__ == "__main__":
    main()
