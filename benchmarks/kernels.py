"""Kernel roofline and timings for one forward+backward of the tiled rasterizer.

Counts the (Gaussian, tile) pairs of structured-init splats of real photos, derives FLOPs and bytes
of one forward+backward, prints the floor on a named GPU, then times what runs here: torch dense,
torch tiled (eager and fused) and, on a CUDA machine, triton and gsplat. Ends with fitting
throughput at 400 Gaussians, 224x224, batch 1 vs batch 1024 (one optimizer step each).
"""

import argparse
import time

import torch
from skimage import data

from splatclip.cuda import render
from splatclip.cuda.binning import bin_gaussians
from splatclip.fitting.images import clip_crop
from splatclip.fitting.init import structured_init

GPUS = {"H100": (3.0e12, 60e12), "A100": (1.9e12, 19.5e12), "L4": (0.3e12, 30e12)}  # bytes/s, fp32 FLOP/s
FLOPS_FWD = 24  # per pixel-pair: 2 sub, 2 div, 1 fma, 2 mul+add (q), compare, exp (~8), 3 fma colors
FLOPS_BWD = 60  # recompute (24) + 3 fma gw, 2 mul gq, 4 gz, 8 reductions with muls, 3 color reductions


def cost(params, height, width):
    bins = bin_gaussians(params, height, width)
    pairs = bins.key.numel()
    B, N, _ = params.shape
    flops = pairs * 256 * (FLOPS_FWD + FLOPS_BWD)
    pixels = B * height * width
    # forward: read 32 B per pair, write 12 B per pixel; backward: read 32 B per pair and the 12 B
    # gradient per pixel, atomically add 32 B per pair
    nbytes = pairs * 32 * 3 + pixels * 12 * 2 + B * N * 32
    return pairs, flops, nbytes


def timed(fn, repeats):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gaussians", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    ap.add_argument("--big-batch", type=int, default=None,
                    help="default 1024 on CUDA; 64 on a CPU, where 1024 images' tile pairs need ~11 GB")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.big_batch = args.big_batch or (1024 if device == "cuda" else 64)
    photos = [clip_crop(getattr(data, n)(), args.size) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    images = torch.stack([photos[i % 4] for i in range(max(args.batch, args.big_batch))]).to(device)
    params = structured_init(images[: args.batch], args.gaussians, backend="torch").detach()

    pairs, flops, nbytes = cost(params, args.size, args.size)
    bw, peak = GPUS[args.gpu]
    floor = max(flops / peak, nbytes / bw)
    print(f"B={args.batch}, N={args.gaussians}, {args.size}x{args.size}: {pairs} (Gaussian, tile) pairs, "
          f"{flops / 1e9:.2f} GFLOP, {nbytes / 1e6:.1f} MB per forward+backward")
    print(f"floor on {args.gpu} ({bw / 1e12:.1f} TB/s, {peak / 1e12:.0f} TFLOP/s fp32): {floor * 1e3:.3f} ms "
          f"({'compute' if flops / peak > nbytes / bw else 'memory'} bound), "
          f"{args.batch / floor:.0f} image-steps/s")

    rows = [("torch-dense", False), ("torch", False), ("torch", True)]
    if device == "cuda":
        rows += [("triton", False), ("gsplat", False)]
    print(f"\n{'backend':<16} {'ms/step':>9} {'image-steps/s':>14} {'x floor':>8}")
    for backend, fused in rows:
        p = params.clone().requires_grad_()

        def step():
            render(p, args.size, args.size, backend=backend, compile=fused).square().sum().backward()

        seconds = timed(step, 1 if backend == "torch-dense" else 3)
        name = backend + (" (fused)" if fused else "")
        print(f"{name:<16} {seconds * 1e3:>9.1f} {args.batch / seconds:>14.1f} {seconds / floor:>8.0f}")

    print(f"\nfitting steps at N=400, {args.size}x{args.size}, backend auto ({'triton' if device == 'cuda' else 'torch, fused'})")
    print(f"{'batch':>6} {'s/step':>8} {'image-steps/s':>14}")
    for b in (1, args.big_batch):
        p = structured_init(images[:b], 400, backend="torch").detach().requires_grad_()
        opt = torch.optim.Adam([p], lr=1e-3)
        target = images[:b]

        def fit_step():
            opt.zero_grad()
            ((render(p, args.size, args.size, compile=device == "cpu") - target) ** 2).mean().backward()
            opt.step()

        seconds = timed(fit_step, 2)
        print(f"{b:>6} {seconds:>8.3f} {b / seconds:>14.1f}")


if __name__ == "__main__":
    main()
