"""What the fit job reports: each shard's record, the job's summary over every record, the failure
budget, and what goes to the terminal and MLflow (metrics, a contact sheet)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from splatclip import splats
from splatclip.fitting.images import clip_crop, decode
from splatclip.pipelines import layout
from splatclip.platform import storage
from splatclip.platform.secrets import redact
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import DEFAULT_LIMITS, FitSpec, ShardLimits
from splatclip.platform.tracking import Tracker

def summarize(records: list[dict], missing: list[str], unfinished: list[str], wall: float, actors: int) -> dict:
    """The job's summary over every input shard's record (this run's and earlier runs')."""
    psnr = np.array([p for r in records for p in r["psnr"]], dtype=np.float64)
    reasons = Counter(e["reason"] for r in records for e in r["errors"])
    images = sum(r["images"] for r in records)
    fitted = sum(r["fitted"] for r in records)
    failed = sum(len(r["errors"]) for r in records if r["status"] == "done")
    splat_bytes = sum(r["bytes"] for r in records)
    busy = sum(r["seconds"] for r in records)
    pct = (lambda q: float(np.percentile(psnr, q))) if len(psnr) else (lambda q: None)
    return {
        "shards": len(records) + len(missing) + len(unfinished),
        "shards_done": sum(r["status"] in ("done", "empty") for r in records),
        "shards_unreadable": [r["shard"] for r in records if r["status"] == "unreadable"],
        "shards_missing": [redact(u) for u in missing],
        "shards_unfinished": [redact(u) for u in unfinished],
        "images": images,
        "fitted": fitted,
        "failed": failed,
        "failed_by_reason": dict(reasons),
        "notes_by_reason": dict(Counter(n["reason"] for r in records for n in r.get("notes", []))),
        "psnr_mean": float(psnr.mean()) if len(psnr) else None,
        "psnr_p5": pct(5),
        "psnr_p50": pct(50),
        "psnr_p95": pct(95),
        "splat_bytes": splat_bytes,
        "source_bytes": sum(r["source_bytes"] for r in records),
        "raw_bytes": sum(r["raw_bytes"] for r in records),
        "ratio_raw": sum(r["raw_bytes"] for r in records) / max(splat_bytes, 1),
        "ratio_source": sum(r["source_bytes"] for r in records) / max(splat_bytes, 1),
        "wall_seconds": wall,
        "images_per_second_per_actor": fitted / busy if busy else None,
        "images_per_second": fitted / wall if wall else None,
        "actors": actors,
    }



def over_budget(summary: dict, spec: FitSpec) -> list[str]:
    """Why the job failed, or [] when it stayed within its failure budget."""
    problems = []
    if summary["images"] and summary["failed"] / summary["images"] > spec.max_failed_fraction:
        problems.append(f"{summary['failed']} of {summary['images']} images failed "
                        f"(budget {spec.max_failed_fraction:.2%})")
    bad_shards = len(summary["shards_unreadable"]) + len(summary["shards_missing"])
    if summary["shards"] and bad_shards / summary["shards"] > spec.max_failed_fraction:
        problems.append(f"{bad_shards} of {summary['shards']} shards unreadable or missing")
    if summary["shards_unfinished"]:
        problems.append(f"{len(summary['shards_unfinished'])} shards unfinished; rerun to complete them")
    return problems



def report(summary: dict, spec: FitSpec, tracker: Tracker, shards: list[str]) -> None:
    """Print the summary; log it, and a contact sheet, to MLflow."""
    keys = ["images", "fitted", "failed", "psnr_mean", "psnr_p5", "psnr_p50", "psnr_p95", "splat_bytes",
            "source_bytes", "raw_bytes", "ratio_raw", "ratio_source", "images_per_second",
            "images_per_second_per_actor", "wall_seconds"]
    print(f"fit summary for {spec.output}")
    for k in keys:
        v = summary[k]
        print(f"  {k:<28} {v:.2f}" if isinstance(v, float) else f"  {k:<28} {v}")
    for reason, count in sorted(summary["failed_by_reason"].items()):
        print(f"  failed: {reason:<20} {count}")
    for reason, count in sorted(summary["notes_by_reason"].items()):
        print(f"  fitted, with a note: {reason:<20} {count}")
    tracker.log_metrics({k: summary[k] for k in keys if isinstance(summary[k], (int, float))})
    if tracker.active:
        sheet = contact_sheet(spec, shards)
        if sheet is not None:
            tracker.log_image(sheet, "contact_sheet.png")
        tracker.log_params({"summary.problems": "; ".join(summary["problems"]) or "none"})


def contact_sheet(spec: FitSpec, shards: list[str], count: int = 8):
    """Up to `count` originals (cropped as fitted) above their renders and error maps."""
    from splatclip import pictures

    originals, renders = [], []
    for shard in shards:
        fitted = layout.output_url(spec.output, shard)
        if len(originals) < count and storage.exists(fitted, spec.storage):
            o, r = fitted_pairs(shard, fitted, spec.fit.size, count - len(originals), spec.storage, spec.limits)
            originals, renders = originals + o, renders + r
    return pictures.contact_sheet(originals, renders) if originals else None


def fitted_pairs(source: str, fitted: str, size: int, count: int, spec=None, limits: ShardLimits = DEFAULT_LIMITS):
    """Up to `count` (original cropped as fitted [3, S, S], render of its splats [3, S, S]) pairs
    from a source shard and its splat shard."""
    from splatclip.cuda import render

    splat_bytes = {s["__key__"]: s["splats.npy"] for s in read_samples(fitted, spec, limits) if "splats.npy" in s}
    originals, renders = [], []
    for sample in read_samples(source, spec, limits, layout.IMAGE_EXTS):
        ext = next((e for e in layout.IMAGE_EXTS if e in sample), None)
        if len(originals) == count:
            break
        if sample["__key__"] not in splat_bytes or ext is None:
            continue
        originals.append(clip_crop(decode(sample[ext], limits), size))
        batch = splats.Splats.from_arrays([splats.from_bytes(splat_bytes[sample["__key__"]])], size, size)
        with torch.no_grad():
            renders.append(render(batch.params, size, size, batch.mask)[0])
    return originals, renders
