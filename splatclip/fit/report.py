"""What the fit job reports: each shard's record, the job's summary over every record, the failure
budget, and what goes to the terminal and MLflow (metrics, a contact sheet). No torch here: the
read stage records the shards it cannot read with `shard_stats`."""

from __future__ import annotations

from collections import Counter

import numpy as np

from splatclip.pipelines import layout
from splatclip.platform import storage
from splatclip.platform.secrets import redact
from splatclip.platform.specs import FitSpec
from splatclip.platform.tracking import Tracker

SHARD_LEVEL = -1  # index of a row that stands for a whole shard (empty or unreadable)


def shard_stats(shard: str, rows: list[dict]) -> dict:
    """The record of one shard from the records of its samples ({index, key, error, detail, notes
    [list], meta [the fitted sample's metrics, or None]}): counts, failed samples (errors) and
    repaired ones (notes) with key and reason, and the per-image figures."""
    if len(rows) == 1 and rows[0]["index"] == SHARD_LEVEL:
        r = rows[0]
        status = "unreadable" if r["error"] == "unreadable_shard" else "empty"
        errors = [{"key": "", "reason": r["error"], "detail": r["detail"]}] if status == "unreadable" else []
        return {"shard": redact(shard), "status": status, "images": 0, "fitted": 0, "errors": errors, "notes": [],
                "psnr": [], "bytes": 0, "source_bytes": 0, "raw_bytes": 0, "seconds": 0.0}
    fitted = [r["meta"] for r in rows if not r["error"]]
    return {
        "shard": redact(shard),
        "status": "done",
        "images": len(rows),
        "fitted": len(fitted),
        "errors": [{"key": r["key"], "reason": r["error"], "detail": r["detail"]} for r in rows if r["error"]],
        "notes": [n for r in rows for n in r["notes"]],
        "psnr": [m["psnr"] for m in fitted],
        "bytes": sum(m["bytes"] for m in fitted),
        "source_bytes": sum(m["source_bytes"] for m in fitted),
        "raw_bytes": sum(m["raw_bytes"] for m in fitted),
        "seconds": sum(m["seconds"] for m in fitted),
    }


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
            "images_per_second_per_actor", "wall_seconds", "batches_refitted"]
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
    """Up to `count` originals (made square and grounded as fitted) above their renders and error maps."""
    from splatclip import pictures

    originals, renders = [], []
    for shard in shards:
        fitted = layout.output_url(spec.output, shard)
        if len(originals) < count and storage.exists(fitted, spec.storage):
            o, r = pictures.fitted_pairs(shard, fitted, spec.fit.size, count - len(originals), spec.storage,
                                         spec.limits, **layout.view_of(spec.fit))
            originals, renders = originals + o, renders + r
    return pictures.contact_sheet(originals, renders) if originals else None
