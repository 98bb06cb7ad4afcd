"""Fit quality at the paper's Gaussian counts: structured vs random init, one batched fit each.

    python benchmarks/fit_quality.py                      # defaults: 4 photos, 1000 iterations
    python benchmarks/fit_quality.py --iterations 3000    # the paper's setting

Prints mean PSNR, SSIM, bytes per image, compression against raw pixels and seconds per image.
"""

import argparse
import time

import torch
from skimage import data

from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop
from splatclip.platform.specs import FitParams


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="astronaut,coffee,chelsea,rocket")
    ap.add_argument("--gaussians", default="400,900,1600,3136")
    ap.add_argument("--inits", default="structured,random")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--prune-tau", type=float, default=0.0)
    args = ap.parse_args()
    names = args.photos.split(",")
    images = torch.stack([clip_crop(getattr(data, n)(), args.size) for n in names])
    print(f"{len(names)} photos ({', '.join(names)}) at {args.size}x{args.size}, {args.iterations} iterations, "
          f"one batch per row, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'N':>5} {'init':<10} {'PSNR dB':>8} {'SSIM':>6} {'live':>6} {'bytes':>7} {'x raw':>6} {'s/img':>7}"
    print(header)
    print("-" * len(header))
    for n in [int(x) for x in args.gaussians.split(",")]:
        for init in args.inits.split(","):
            cfg = FitParams(gaussians=n, iterations=args.iterations, size=args.size, init=init,
                            prune_tau=args.prune_tau)
            start = time.perf_counter()
            result = fit_batch(images, cfg)
            seconds = (time.perf_counter() - start) / len(names)
            m = result.metrics
            mean = lambda k: sum(x[k] for x in m) / len(m)  # noqa: E731
            print(f"{n:>5} {init:<10} {mean('psnr'):>8.2f} {mean('ssim'):>6.3f} {mean('gaussians'):>6.0f} "
                  f"{mean('bytes'):>7.0f} {mean('ratio_raw'):>6.1f} {seconds:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
