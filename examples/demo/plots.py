"""The demo's pictures: a contact sheet of fits, accuracy against bytes per image, rate-distortion of
splats against JPEG at the same bytes, and the training curves (read back from MLflow)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from splatclip import pictures
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop, decode
from splatclip.pipelines.layout import fit_recipe, view_of
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import FitParams

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def contact_sheet(root: Path, points: tuple[int, ...]) -> np.ndarray:
    """Photos, then digits at each point and sklearn's digits: original (as its fit saw it) | splats |
    error, row by row."""
    rows = []
    sources = [("photos", "photos", 128)] + [("test", f"g{n}", 28) for n in points] + [("sklearn", f"g{points[0]}", 28)]
    for prefix, out, size in sources:
        shard = root / "data" / f"{prefix}-00000.tar"
        fitted = str(root / "splats" / out / shard.name)
        originals, renders = pictures.fitted_pairs(str(shard), fitted, size, 8, **view_of(fit_recipe([fitted])))
        if size < 100:  # digits: enlarge to be visible
            originals = [torch.nn.functional.interpolate(o[None], scale_factor=4, mode="nearest")[0] for o in originals]
            renders = [torch.nn.functional.interpolate(r[None], scale_factor=4, mode="nearest")[0] for r in renders]
        rows.append(pictures.contact_sheet(originals, renders))
    return pictures.vstack(rows, gap=16)


def accuracy_plot(results: dict, sets: dict[str, str], points: tuple[int, ...], path: Path) -> None:
    """Zero-shot top-1 against bytes per image: splats at each point (circles, joined), the RGB teacher
    at raw pixels (squares), a colour per test set."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors
    lowest = 1.0
    for (split, label), color in zip(sets.items(), colors * 2):
        xy = sorted((results[(split, n)]["compression"]["splat_bytes"], results[(split, n)]["splat"]["top1"])
                    for n in points if (split, n) in results)
        rgb = results[(split, points[0])]
        ax.plot(*zip(*xy), marker="o", color=color, label=label)
        ax.plot([rgb["compression"]["raw_bytes"]], [rgb["rgb"]["top1"]], marker="s", color=color, linestyle="none")
        lowest = min(lowest, rgb["rgb"]["top1"], *(y for _, y in xy))
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (28x28)")
    ax.set_ylabel("zero-shot top-1")
    ax.set_ylim(min(0.7, lowest - 0.05), 1)
    ax.set_title("Accuracy against compression")
    kinds = [Line2D([], [], marker=m, color="gray", linestyle=ls, label=name)
             for m, ls, name in (("o", "-", "splats"), ("s", "none", "RGB teacher, raw pixels"))]
    first = ax.legend(handles=kinds, fontsize=7, loc="lower right")
    ax.add_artist(first)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # the sets, beside the axes
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


def rate_distortion(photos: Path, gaussians: tuple[int, ...], iterations: int, compile: bool, path: Path) -> list[dict]:
    """Photos at 128x128: splats at several N against JPEG at the same bytes."""
    images = []
    for s in read_samples(str(photos)):
        ext = "jpg" if "jpg" in s else "png"
        images.append(clip_crop(decode(s[ext]), 128))
    images = torch.stack(images[:4])
    points = []
    for n in gaussians:
        result = fit_batch(images, FitParams(gaussians=n, iterations=iterations, size=128, compile=compile))
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


def curves(root: Path, names: list[str], path: Path) -> None:
    """Training loss of the teacher and of each splat encoder, from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
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
