"""The fit job at scale, on one machine: pipeline overhead, writer throughput, memory against the
number of shards, and the CPU cost per image of each stage (the figure to size a cluster with).

1. Trivial fitting (1 iteration, 4 Gaussians, 28x28 example digits), so what is timed is the
   platform: the job on 4S shards against a plain one-process loop over the same library calls
   (read_samples, decode + crop, fit_batch, write_shard). Each job gets a fresh local Ray sized
   for its spec; Ray's start-up is timed apart, with Ray Data's own cluster services (its stats
   and autoscaling actors), which start once per cluster.
2. Rows/s with 1 and 2 fitting actors (each actor is a writing process: it writes its own parts
   and commits the shards it completes).
3. Peak resident memory of every Ray worker process (read and decode tasks, fitting actors),
   sampled every 0.2 s, at S and at 4S shards of the same size: flat means the job's memory does
   not grow with the number of shards.
4. CPU milliseconds per image of read, decode (to 224x224), fit (the trivial fit) and write, on
   224x224-and-larger JPEG photos, in one process (`time.process_time`).

`--quick` runs a reduced size in a few minutes. Prints a table; the last line is
`pipeline/plain X.XXx; peak actor MB at S shards A, at 4S shards B`.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time

import ray
import torch

from splatclip import datasets, splats
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop, decode
from splatclip.fit.job import run
from splatclip.platform.runtime import init_ray
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import FitSpec

TRIVIAL = ["fit.iterations=1", "fit.gaussians=4", "fit.size=28", "fit.compile=false", "fit.backend=torch"]


def ray_processes() -> dict[str, float]:
    """{process title: peak RSS in MB so far (the kernel's VmHWM)} of Ray's worker processes (titles
    start with ray::) on this machine, from /proc."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if not title.startswith("ray::"):
                continue
            with open(f"/proc/{pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            continue
        found[f"{title.split(' ')[0]}#{pid}"] = hwm / 1024
    return found


class PeakMemory:
    """Peak RSS (MB) of Ray's worker processes, sampled in a thread (VmHWM: no peak is missed
    between samples, only processes that live less than a period)."""

    def __init__(self, period: float = 0.2):
        self.period, self.peak, self._stop = period, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name, mb in ray_processes().items():
                self.peak[name] = max(self.peak.get(name, 0.0), mb)
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def actors(self) -> float:
        return max((v for k, v in self.peak.items() if "FitActor" in k), default=0.0)


def digit_shards(directory: str, shards: int, per_shard: int) -> str:
    samples = datasets.digits("train", limit=shards * per_shard)
    datasets.write_shards(samples, directory, "d", per_shard)
    return f"{directory}/d-{{00000..{shards - 1:05d}}}.tar"


def job_spec(pattern: str, out: str, actors: int, batch: int) -> FitSpec:
    return load_spec(FitSpec, None, [f"input={pattern}", f"output={out}", "tracking.enabled=false",
                                     f"ray.actors={actors}", "ray.cpus_per_actor=1", f"batch_size={batch}", *TRIVIAL])


def plain_loop(pattern: str, out: str, spec: FitSpec) -> float:
    """The same library calls in one process, shard by shard, batch by batch."""
    from splatclip.platform.storage import expand_braces

    start = time.perf_counter()
    for url in expand_braces(pattern):
        samples = list(read_samples(url))
        with write_shard(f"{out}/{url.rsplit('/', 1)[1]}") as writer:
            for b in range(0, len(samples), spec.batch_size):
                chunk = samples[b : b + spec.batch_size]
                images = torch.stack([clip_crop(decode(s["png"]), spec.fit.size) for s in chunk])
                result = fit_batch(images, spec.fit, [len(s["png"]) for s in chunk])
                for j, s in enumerate(chunk):
                    writer.write({"__key__": s["__key__"], "splats.npy": splats.to_bytes(result.splats.encode(j)),
                                  "txt": s["txt"]})
    return time.perf_counter() - start


def timed_job(spec: FitSpec) -> tuple[float, float, float]:
    """(Ray start-up, job seconds, peak actor MB): a fresh local Ray sized for the spec (see
    runtime.local_cpus), with Ray Data's cluster services (its stats and autoscaling actors, which
    start once per cluster) started before the clock."""
    t = time.perf_counter()
    init_ray(spec.ray)
    ray.data.range(1).materialize()
    ray_start = time.perf_counter() - t
    try:
        with PeakMemory() as memory:
            start = time.perf_counter()
            assert run(spec) == 0
            return ray_start, time.perf_counter() - start, memory.actors()
    finally:
        ray.shutdown()


def stage_costs(tmp: str, images: int) -> dict[str, float]:
    """CPU ms per image of each stage on JPEG photos (scikit-image's, 300-512 px), cropped to 224."""
    photos = datasets.photos()
    samples = [{**photos[i % len(photos)], "__key__": f"p{i:04d}"} for i in range(images)]
    datasets.write_shards(samples, f"{tmp}/photos", "p", images)
    url = f"{tmp}/photos/p-00000.tar"
    cfg = job_spec(url, f"{tmp}/unused", 1, 16).fit.model_copy(update={"size": 224})
    t = time.process_time()
    read = list(read_samples(url))
    t_read = time.process_time() - t
    t = time.process_time()
    crops = [clip_crop(decode(s.get("jpg") or s["png"]), 224) for s in read]
    t_decode = time.process_time() - t
    t = time.process_time()
    fitted = [fit_batch(torch.stack(crops[b : b + 16]), cfg) for b in range(0, len(crops), 16)]
    t_fit = time.process_time() - t
    t = time.process_time()
    with write_shard(f"{tmp}/photos-out.tar") as writer:
        for b, result in enumerate(fitted):
            for j in range(len(result.metrics)):
                writer.write({"__key__": f"k{b}-{j}", "splats.npy": splats.to_bytes(result.splats.encode(j))})
    t_write = time.process_time() - t
    return {k: 1000 * v / images for k, v in (("read", t_read), ("decode", t_decode), ("fit (trivial)", t_fit),
                                              ("write", t_write))}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a reduced size, a few minutes here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shards, per_shard, batch = (2, 250, 250) if args.quick else (4, 250, 250)
    torch.set_num_threads(1)  # the plain loop gets what one 1-CPU actor gets
    with tempfile.TemporaryDirectory() as tmp:
        small = digit_shards(f"{tmp}/s", shards, per_shard)
        large = digit_shards(f"{tmp}/l", 4 * shards, per_shard)
        plain = plain_loop(large, f"{tmp}/plain", job_spec(large, f"{tmp}/plain", 1, batch))
        n_large = 4 * shards * per_shard
        start_large, job_large, mem_large = timed_job(job_spec(large, f"{tmp}/job-large", 1, batch))
        start_small, job_small, mem_small = timed_job(job_spec(small, f"{tmp}/job-small", 1, batch))
        start_two, job_two, _ = timed_job(job_spec(large, f"{tmp}/job-two", 2, batch))
        costs = stage_costs(tmp, 32 if args.quick else 64)

    print(f"fit_scale: digits 28x28, 1 iteration, 4 Gaussians, shards of {per_shard}, batches of {batch}; "
          f"Ray start-up {min(start_large, start_small, start_two):.1f}-{max(start_large, start_small, start_two):.1f} s "
          f"(not counted; a fresh local Ray per job, {os.cpu_count()} cores)")
    print(f"{'run':<40} {'images':>7} {'seconds':>8} {'images/s':>9} {'per writer':>11}")
    rows = [("plain loop, one process", n_large, plain, 1), (f"job, {4 * shards} shards, 1 actor", n_large, job_large, 1),
            (f"job, {4 * shards} shards, 2 actors", n_large, job_two, 2),
            (f"job, {shards} shards, 1 actor", shards * per_shard, job_small, 1)]
    for name, n, seconds, writers in rows:
        print(f"{name:<40} {n:>7} {seconds:>8.2f} {n / seconds:>9.1f} {n / seconds / writers:>11.1f}")
    print(f"peak fitting-actor RSS: {mem_small:.0f} MB at {shards} shards, {mem_large:.0f} MB at {4 * shards} shards "
          f"({mem_large / max(mem_small, 1e-9):.2f}x)")
    print("CPU ms per image, 224x224 JPEG photos, one process:")
    for stage, ms in costs.items():
        print(f"  {stage:<14} {ms:8.2f}")
    print(f"pipeline/plain {job_large / plain:.2f}x; peak actor MB at S shards {mem_small:.0f}, "
          f"at 4S shards {mem_large:.0f}")


if __name__ == "__main__":
    main()
