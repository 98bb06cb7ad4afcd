"""The fit job: Ray Data turns image-text shards into splat shards.

    shard URLs -> read (tasks: one shard each, images stay encoded)
               -> decode (tasks: EXIF, mode conversion, CLIP crop)
               -> fit (actor pool: one batch of images per optimizer step, optional teacher)
               -> write (one actor: buffers rows until a shard is complete, commits it whole)

Each input shard becomes one output shard with the same name. Its statistics and error list go to
`_stats/NAME.json` before the tar is committed, so a committed tar always has its record. A rerun
skips committed shards. Bad samples are recorded with key and reason and the job goes on; the exit
status is non-zero only when the failure budget is exceeded (or shards were left unfinished).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from collections import Counter

import numpy as np
import torch

from splatclip import splats
from splatclip.fitting.images import ImageError, clip_crop, decode
from splatclip.platform import storage
from splatclip.platform.runtime import actor_options, init_ray, pool_size
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.specs import FitSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_LEVEL = -1  # index of a row that stands for a whole shard (empty or unreadable)


def shard_name(url: str) -> str:
    return posixpath.basename(url)


def output_url(spec: FitSpec, shard: str) -> str:
    return storage.join(spec.output, shard_name(shard))


def stats_url(spec: FitSpec, shard: str) -> str:
    return storage.join(spec.output, "_stats", shard_name(shard).removesuffix(".tar") + ".json")


def _row(shard, index, total, key="", image=b"", txt=b"", cls=b"", source=b"", error="", detail=""):
    return {"shard": shard, "index": index, "total": total, "key": key, "image": image, "txt": txt,
            "cls": cls, "source": source, "error": error, "detail": detail}


def read_shard(item: dict, spec: FitSpec) -> list[dict]:
    """One source shard -> one row per sample, images still encoded. A shard that cannot be read
    to its end becomes a single shard-level row, so it is reported and never half-written."""
    url = item["shard"]
    rows = []
    try:
        for i, sample in enumerate(read_samples(url, spec.storage)):
            key = sample["__key__"]
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if "__error__" in sample:
                rows.append(_row(url, i, 0, key, error="unsafe_path", detail=sample["__error__"]))
            elif ext is None:
                rows.append(_row(url, i, 0, key, error="no_image", detail=f"members: {sorted(sample)}"))
            else:
                rows.append(_row(url, i, 0, key, sample[ext], sample.get("txt", b""), sample.get("cls", b""),
                                 sample.get("json", b"")))
    except Exception as err:  # a corrupt or unreachable archive
        log.warning("shard %s is unreadable: %s", url, err)
        return [_row(url, SHARD_LEVEL, 0, error="unreadable_shard", detail=f"{type(err).__name__}: {err}")]
    if not rows:
        return [_row(url, SHARD_LEVEL, 0, error="empty_shard")]
    for r in rows:
        r["total"] = len(rows)
    return rows


def decode_batch(batch: dict, size: int, max_pixels: int) -> dict:
    """Encoded bytes -> cropped uint8 [S, S, 3] (a CPU task per batch). Drops the encoded bytes."""
    n = len(batch["key"])
    pixels = np.zeros((n, size, size, 3), np.uint8)
    src_w, src_h = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors, details = list(batch["error"]), list(batch["detail"])
    for i in range(n):
        if errors[i] or batch["index"][i] == SHARD_LEVEL:
            continue
        try:
            rgb = decode(batch["image"][i], max_pixels)
        except ImageError as err:
            errors[i], details[i] = err.reason, str(err)
            continue
        src_h[i], src_w[i] = rgb.shape[:2]
        pixels[i] = (clip_crop(rgb, size).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(pixels=pixels, src_w=src_w, src_h=src_h, error=np.array(errors, dtype=object),
               detail=np.array(details, dtype=object),
               src_bytes=np.array([len(b) for b in batch["image"]], np.int64))
    return out


class FitActor:
    """Holds the (optional) teacher model and fits whole batches on its device."""

    def __init__(self, spec: FitSpec):
        self.spec = spec
        want_gpu = spec.ray.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")
        self.teacher = None
        if spec.teacher is not None:
            from splatclip.models.backbone import create

            self.teacher, _ = create(spec.teacher.model, spec.teacher.pretrained, spec.storage, self.device)

    def __call__(self, batch: dict) -> dict:
        from splatclip.fitting.fitter import fit_batch

        n = len(batch["key"])
        errors, details = list(batch["error"]), list(batch["detail"])
        splat_bytes, meta, teacher = [b""] * n, [b""] * n, [b""] * n
        ok = [i for i in range(n) if not errors[i] and batch["index"][i] != SHARD_LEVEL]
        if ok:
            images = torch.from_numpy(np.stack([batch["pixels"][i] for i in ok])).to(self.device)
            images = images.permute(0, 3, 1, 2).float() / 255.0
            try:
                result = fit_batch(images, self.spec.fit, [int(batch["src_bytes"][i]) for i in ok])
                embeddings = self._teacher(images)
            except Exception as err:  # a batch that cannot be fitted is recorded, not fatal
                log.exception("fitting a batch of %d failed", len(ok))
                for i in ok:
                    errors[i], details[i] = "fit_failed", f"{type(err).__name__}: {err}"
                ok, result = [], None
            for j, i in enumerate(ok):
                splat_bytes[i] = splats.to_bytes(result.splats.encode(j))
                record = {**result.metrics[j], "source_width": int(batch["src_w"][i]),
                          "source_height": int(batch["src_h"][i])}
                if batch["source"][i]:
                    try:
                        record["source"] = json.loads(batch["source"][i])
                    except ValueError:
                        record["source"] = None
                meta[i] = json.dumps(record, sort_keys=True).encode()
                if embeddings is not None:
                    buf = io.BytesIO()
                    np.save(buf, embeddings[j].cpu().numpy().astype(np.float16), allow_pickle=False)
                    teacher[i] = buf.getvalue()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(splats=np.array(splat_bytes, dtype=object), meta=np.array(meta, dtype=object),
                   teacher=np.array(teacher, dtype=object), error=np.array(errors, dtype=object),
                   detail=np.array(details, dtype=object))
        return out

    def _teacher(self, images):
        if self.teacher is None:
            return None
        from splatclip.models.backbone import embed_images

        return embed_images(self.teacher, images)


class ShardWriter:
    """Buffers fitted rows per shard; commits a shard (stats first, then the tar) once all of its
    rows have arrived. Emits one row per committed shard with its statistics."""

    def __init__(self, spec: FitSpec):
        self.spec = spec
        self.pending: dict[str, list[dict]] = {}

    def __call__(self, batch: dict) -> dict:
        done = []
        for i in range(len(batch["key"])):
            row = {k: batch[k][i] for k in batch}
            shard = row["shard"]
            if row["index"] == SHARD_LEVEL:
                done.append(self.commit(shard, [row]))
                continue
            rows = self.pending.setdefault(shard, [])
            rows.append(row)
            if len(rows) == row["total"]:
                done.append(self.commit(shard, self.pending.pop(shard)))
        return {"shard": np.array([d["shard"] for d in done], dtype=object),
                "stats": np.array([json.dumps(d) for d in done], dtype=object)}

    def commit(self, shard: str, rows: list[dict]) -> dict:
        rows.sort(key=lambda r: r["index"])
        stats = shard_stats(shard, rows)
        storage.write_json(stats_url(self.spec, shard), stats, self.spec.storage)
        if stats["status"] != "unreadable":
            with write_shard(output_url(self.spec, shard), self.spec.storage) as writer:
                for r in rows:
                    if r["index"] == SHARD_LEVEL or r["error"]:
                        continue
                    sample = {"__key__": r["key"], "splats.npy": r["splats"], "json": r["meta"]}
                    for ext in ("txt", "cls", "teacher"):
                        if r[ext]:
                            sample[f"{ext}.npy" if ext == "teacher" else ext] = r[ext]
                    writer.write(sample)
        log.info("committed %s: %d fitted, %d failed", shard_name(shard), stats["fitted"], len(stats["errors"]))
        return stats


def shard_stats(shard: str, rows: list[dict]) -> dict:
    """The record of one shard: counts, errors with key and reason, and the per-image figures."""
    if len(rows) == 1 and rows[0]["index"] == SHARD_LEVEL:
        r = rows[0]
        status = "unreadable" if r["error"] == "unreadable_shard" else "empty"
        errors = [{"key": "", "reason": r["error"], "detail": r["detail"]}] if status == "unreadable" else []
        return {"shard": shard, "status": status, "images": 0, "fitted": 0, "errors": errors, "psnr": [],
                "bytes": 0, "source_bytes": 0, "raw_bytes": 0, "seconds": 0.0}
    fitted = [json.loads(r["meta"]) for r in rows if not r["error"]]
    return {
        "shard": shard,
        "status": "done",
        "images": len(rows),
        "fitted": len(fitted),
        "errors": [{"key": r["key"], "reason": r["error"], "detail": r["detail"]} for r in rows if r["error"]],
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
        "shards_missing": missing,
        "shards_unfinished": unfinished,
        "images": images,
        "fitted": fitted,
        "failed": failed,
        "failed_by_reason": dict(reasons),
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


def build_dataset(spec: FitSpec, todo: list[str]):
    import ray

    lo, hi = pool_size(spec.ray)
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=max(1, len(todo)))
    ds = ds.flat_map(read_shard, fn_kwargs={"spec": spec})
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": spec.fit.size, "max_pixels": spec.max_image_pixels},
                        batch_size=spec.batch_size, num_cpus=0.5)
    ds = ds.map_batches(FitActor, fn_constructor_kwargs={"spec": spec}, batch_size=spec.batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), **actor_options(spec.ray))
    return ds.map_batches(ShardWriter, fn_constructor_kwargs={"spec": spec}, batch_size=None,
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)


def run(spec: FitSpec) -> int:
    start = time.perf_counter()
    shards, missing = storage.input_shards(spec.input, spec.storage, "input")
    if not shards:
        return 2
    todo = [s for s in shards if not storage.exists(output_url(spec, s), spec.storage)]
    log.info("%d input shards: %d already done, %d to fit", len(shards), len(shards) - len(todo), len(todo))

    tracker = Tracker(spec.tracking, "fit")
    run_file = storage.join(spec.output, "_mlflow_run.json")
    previous = storage.read_json(run_file, spec.storage) if storage.exists(run_file, spec.storage) else {}
    run_id = tracker.start(spec, resume_run_id=previous.get("run_id"))
    if run_id:
        storage.write_json(run_file, {"run_id": run_id, "tracking_uri": spec.tracking.uri}, spec.storage)

    if todo:
        with tracker.failed_on_error():
            init_ray(spec.ray)
            for committed, row in enumerate(build_dataset(spec, todo).iter_rows(), 1):
                stats = json.loads(row["stats"])
                tracker.log_metrics({"shards_committed": committed, "images_fitted": stats["fitted"]},
                                    step=committed)
    records, unfinished = [], []
    for s in shards:
        url = stats_url(spec, s)
        record = storage.read_json(url, spec.storage) if storage.exists(url, spec.storage) else None
        if record and (record["status"] == "unreadable" or storage.exists(output_url(spec, s), spec.storage)):
            records.append(record)
        else:
            unfinished.append(s)
    summary = summarize(records, missing, unfinished, time.perf_counter() - start, pool_size(spec.ray)[1])
    problems = over_budget(summary, spec)
    summary["ok"] = not problems
    summary["problems"] = problems
    storage.write_json(storage.join(spec.output, "_summary.json"), summary, spec.storage)
    if not problems:
        storage.mark_success(spec.output, {"shards": [shard_name(s) for s in shards], "summary": "_summary.json"},
                             spec.storage)
    report(summary, spec, tracker, shards)
    tracker.end("FINISHED" if not problems else "FAILED")
    for p in problems:
        log.error("fit job failed: %s", p)
    return 0 if not problems else 1


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
        if len(originals) < count and storage.exists(output_url(spec, shard), spec.storage):
            o, r = fitted_pairs(shard, output_url(spec, shard), spec.fit.size, count - len(originals), spec.storage,
                                spec.max_image_pixels)
            originals, renders = originals + o, renders + r
    return pictures.contact_sheet(originals, renders) if originals else None


def fitted_pairs(source: str, fitted: str, size: int, count: int, spec=None, max_pixels: int = 89_478_485):
    """Up to `count` (original cropped as fitted [3, S, S], render of its splats [3, S, S]) pairs
    from a source shard and its splat shard."""
    from splatclip.cuda import render

    splat_bytes = {s["__key__"]: s["splats.npy"] for s in read_samples(fitted, spec) if "splats.npy" in s}
    originals, renders = [], []
    for sample in read_samples(source, spec):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if len(originals) == count:
            break
        if sample["__key__"] not in splat_bytes or ext is None:
            continue
        originals.append(clip_crop(decode(sample[ext], max_pixels), size))
        batch = splats.Splats.from_arrays([splats.from_bytes(splat_bytes[sample["__key__"]])], size, size)
        with torch.no_grad():
            renders.append(render(batch.params, size, size, batch.mask)[0])
    return originals, renders
