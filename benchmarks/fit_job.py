"""The fit job's end-to-end throughput against the same fitter called in a plain loop.

64 photos (scikit-image's, repeated) at 224x224 with 400 Gaussians, written as 4 shards of 16. The
plain loop fits the same crops in batches of --batch-size; the job reads, decodes, fits with one
actor and writes shards through Ray Data, once with a 1-CPU actor (Ray gives it one torch thread)
and once with a 2-CPU actor. The difference is the overhead Ray adds on this machine; Ray's start-up
is timed apart.
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from splatclip import datasets
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop, decode
from splatclip.fit.job import run
from splatclip.platform.runtime import init_ray
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import FitSpec


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--target-psnr", type=float, default=28.0, help="the job again with this target, the "
                    "iterations its ceiling")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    photos = datasets.photos()
    samples = []
    for i in range(args.images):
        s = dict(photos[i % len(photos)])
        s["__key__"] = f"{s['__key__']}-{i:03d}"
        samples.append(s)
    with tempfile.TemporaryDirectory() as tmp:
        datasets.write_shards(samples, f"{tmp}/src", "bench", 16)
        spec = load_spec(FitSpec, None, [
            f"input={tmp}/src/bench-{{00000..{(args.images - 1) // 16:05d}}}.tar", f"output={tmp}/out",
            f"fit.iterations={args.iterations}", "fit.gaussians=400", f"batch_size={args.batch_size}",
            "tracking.enabled=false", "ray.actors=1", "ray.cpus_per_actor=1",
        ])
        images = []
        for s in samples:
            ext = "jpg" if "jpg" in s else "png"
            images.append(clip_crop(decode(s[ext]), 224))
        warm = FitSpec.model_validate({**spec.model_dump(), "fit": {**spec.fit.model_dump(), "iterations": 2}})
        fit_batch(torch.stack(images[:1]), warm.fit)  # compile once, outside both timings

        start = time.perf_counter()
        for b in range(0, len(images), args.batch_size):
            fit_batch(torch.stack(images[b : b + args.batch_size]), spec.fit)
        loop = time.perf_counter() - start

        start = time.perf_counter()
        # CPUs for the largest actor (2) and the decode tasks beside it: with only the cores (2) the
        # 2-CPU actor held both and the decode tasks never ran
        init_ray(spec.ray.model_copy(update={"num_cpus": 3}))
        startup = time.perf_counter() - start
        jobs = {}
        for cpus in (1, 2):
            cspec = spec.model_copy(update={"output": f"{tmp}/out-{cpus}",
                                            "ray": spec.ray.model_copy(update={"cpus_per_actor": cpus})})
            start = time.perf_counter()
            assert run(cspec) == 0
            jobs[cpus] = time.perf_counter() - start
        target = spec.model_copy(update={"output": f"{tmp}/out-target", "ray": spec.ray.model_copy(
            update={"cpus_per_actor": 2}), "fit": spec.fit.model_copy(update={"target_psnr": args.target_psnr})})
        start = time.perf_counter()
        assert run(target) == 0
        target_seconds = time.perf_counter() - start
        psnr = {name: json.loads(Path(f"{tmp}/{name}/_summary.json").read_text())["psnr_mean"]
                for name in ("out-2", "out-target")}
    print(f"\n{args.images} images, 224x224, 400 Gaussians, {args.iterations} iterations, batch {args.batch_size}; "
          f"{torch.get_num_threads()} torch threads in the plain loop; Ray start-up {startup:.1f} s (not included)")
    print(f"{'path':<34} {'seconds':>8} {'images/s':>9} {'vs loop':>8}")
    print(f"{'plain loop (fit_batch)':<34} {loop:>8.1f} {args.images / loop:>9.3f} {1:>7.2f}x")
    for cpus, seconds in jobs.items():
        name = f"fit job (Ray Data, 1 actor, {cpus} CPU)"
        print(f"{name:<34} {seconds:>8.1f} {args.images / seconds:>9.3f} {seconds / loop:>7.2f}x")
    print(f"\nthe fit job (1 actor, 2 CPU) fitting {args.iterations} iterations against a target of "
          f"{args.target_psnr:g} dB with {args.iterations} as its ceiling")
    print(f"{'fit':<34} {'seconds':>8} {'images/s':>9} {'PSNR dB':>8}")
    print(f"{f'{args.iterations} iterations':<34} {jobs[2]:>8.1f} {args.images / jobs[2]:>9.3f} {psnr['out-2']:>8.2f}")
    print(f"{f'target {args.target_psnr:g} dB':<34} {target_seconds:>8.1f} {args.images / target_seconds:>9.3f} "
          f"{psnr['out-target']:>8.2f}")


if __name__ == "__main__":
    main()
