"""The fit job's CPU stages, one row per sample (the fitting actor is in `fit_actor`):

    read_shard    (task per shard)    samples not yet in a part, images still encoded; metadata
                                      checked and cleaned
    decode_batch  (CPU tasks)         decode and crop each image, within the spec's limits

Nothing here imports torch: the processes that run these tasks (on CPU-only nodes too) start in
a fraction of a second and hold ~150 MB, not the ~700 MB of a process with torch loaded.

A row that goes wrong carries `error` (a short reason) and `detail` and travels on, so that its
shard's record names it; `notes` holds problems of a sample that was still fitted (a bad caption,
an oversized member). No single sample can stop a stage.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from splatclip.fitting.images import IMAGE_EXTS, ImageError, crop, decode, image_member
from splatclip.fit import parts
from splatclip.fit.report import SHARD_LEVEL, shard_stats
from splatclip.pipelines import layout
from splatclip.platform import storage
from splatclip.platform.secrets import redact
from splatclip.platform.shards import ShardError, problems, read_samples, write_shard
from splatclip.platform.specs import FitSpec, ShardLimits

log = logging.getLogger(__name__)

WANTED = (*IMAGE_EXTS, *layout.METADATA_EXTS)
MAX_JSON_DEPTH = 32  # a sample's .json deeper than this is dropped (every later parse stays far from the stack limit)


# One row per sample, the same columns for every row (Ray Data batches rows into columns): the
# sample's position in its shard (`total` is set once the shard is read), its members, and what went
# wrong with it (`error`, `detail`) or was repaired (`notes`, JSON).
ROW = {"total": 0, "key": "", "image": b"", "txt": b"", "cls": b"", "source": b"", "error": "", "detail": "",
       "notes": "[]"}


def _row(shard: str, index: int, **fields) -> dict:
    return {"shard": shard, "index": index, **ROW, **fields}


def clean_metadata(sample: dict, limits: ShardLimits) -> tuple[dict, list[dict]]:
    """The sample's txt, cls and json members as they will be written (valid UTF-8 text, a class id,
    re-serialized JSON), and a note for each one that was dropped or repaired."""
    key, out, notes = sample["__key__"], {"txt": b"", "cls": b"", "source": b""}, []

    def note(member, reason, detail):
        notes.append({"key": key, "member": member, "reason": reason, "detail": detail})

    for ext in layout.METADATA_EXTS:
        data = sample.get(ext)
        if data is None:
            continue
        if len(data) > limits.max_metadata_bytes:
            note(ext, "metadata_too_large", f"{len(data)} bytes (limit {limits.max_metadata_bytes})")
            continue
        if ext == "txt":
            text = data.decode("utf-8", "replace")
            if "\ufffd" in text and b"\xef\xbf\xbd" not in data:
                note(ext, "bad_text", "not valid UTF-8; invalid bytes replaced")
            out["txt"] = text.encode("utf-8")
        elif ext == "cls":
            label = layout.class_id(data)
            if label is None:
                note(ext, "bad_class", f"not a class id below 2**31: {data[:32]!r}")
                continue
            out["cls"] = str(label).encode()
        else:
            try:
                parsed = json.loads(data, parse_constant=_refuse_constant)
                if _depth(parsed) > MAX_JSON_DEPTH:
                    raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
                out["source"] = json.dumps(parsed, sort_keys=True).encode()
            except (ValueError, RecursionError, UnicodeDecodeError) as err:
                note(ext, "bad_metadata", f"{type(err).__name__}: {str(err)[:200]}")
    return out, notes


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_shard(item: dict, spec: FitSpec) -> list[dict]:
    """One source shard -> one row per sample (and per lost part of it) that no earlier part holds,
    images still encoded. A shard that cannot be opened at all, or holds nothing, is recorded here
    and yields no row; so is a shard whose parts were all written before a kill."""
    url = item["shard"]
    rows = []
    try:
        for sample in read_samples(url, spec.storage, spec.limits, WANTED):
            rows.append(sample_row(url, len(rows), sample, spec.limits))
    except ShardError as err:
        log.warning("shard %s is unreadable: %s", redact(url), err)
        return commit_whole(spec, url, "unreadable_shard", str(err))
    if not rows:
        return commit_whole(spec, url, "empty_shard", "")
    total = len(rows)
    for r in rows:
        r["total"] = total
    try:
        done = parts.covered(spec, url)
        if done:
            log.info("%s: %d of %d samples are in parts already", layout.shard_name(url), len(done), len(rows))
            rows = [r for r in rows if r["index"] not in done]
            if not rows:
                parts.commit_if_complete(spec, url, total)
    except storage.LinkError as err:  # planted after the job checked its output: the shard stays unfinished
        log.error("shard %s not committed: %s", layout.shard_name(url), err)
        return []
    return rows


def commit_whole(spec: FitSpec, url: str, reason: str, detail: str) -> list:
    """Record a shard with no sample to fit: unreadable (a record only) or empty (and an empty tar).
    No rows come of it."""
    stats = shard_stats(url, [{"index": SHARD_LEVEL, "key": "", "error": reason, "detail": detail}])
    try:
        storage.write_json(layout.stats_url(spec.output, url), stats, spec.storage, spec.output)
        if stats["status"] == "empty":
            with write_shard(layout.output_url(spec.output, url), spec.storage, spec.output):
                pass
    except storage.LinkError as err:  # planted after the job checked its output: the shard stays unfinished
        log.error("shard %s not recorded: %s", layout.shard_name(url), err)
    return []


def sample_row(url: str, index: int, sample: dict, limits: ShardLimits) -> dict:
    key = sample["__key__"]
    found = problems(sample)
    notes = [{"key": key, "member": m, "reason": r, "detail": d} for m, r, d in found if m]
    lost = [(r, d) for m, r, d in found if not m]  # problems of the whole sample
    ext = image_member(sample)
    if lost or ext is None:
        image_problem = next(((r, d) for m, r, d in found if m in IMAGE_EXTS), None)
        reason, detail = lost[0] if lost else image_problem or ("no_image", f"members: {sorted(sample)}")
        return _row(url, index, key=key, error=reason, detail=detail)
    meta, meta_notes = clean_metadata(sample, limits)
    return _row(url, index, key=key, image=sample[ext], **meta, notes=json.dumps(notes + meta_notes))


def decode_batch(batch: dict, size: int, limits: ShardLimits, **view: str) -> dict:
    """Encoded bytes -> uint8 [S, S, 3], made square, grounded, cleared and stroked as `view` says (`images.crop`;
    a CPU task per batch). Drops the encoded bytes."""
    n = len(batch["key"])
    pixels = np.zeros((n, size, size, 3), np.uint8)
    src_w, src_h = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors, details = list(batch["error"]), list(batch["detail"])
    for i in range(n):
        if errors[i]:
            continue
        try:
            rgb = decode(batch["image"][i], limits)
            pixels[i] = crop(rgb, size, **view)
        except ImageError as err:
            errors[i], details[i] = err.reason, str(err)
            continue
        except Exception as err:  # nothing one image does may stop the stage
            errors[i], details[i] = "undecodable", f"{type(err).__name__}: {err}"[:300]
            continue
        src_h[i], src_w[i] = rgb.shape[:2]
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(pixels=pixels, src_w=src_w, src_h=src_h, error=np.array(errors, dtype=object),
               detail=np.array(details, dtype=object),
               src_bytes=np.array([len(b) for b in batch["image"]], np.int64))
    return out
