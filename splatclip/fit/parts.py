"""The fit job's distributed commit: fitted rows are written where they are fitted, as parts, and a
shard is committed whole once its parts cover every one of its samples.

    OUTPUT/_parts/NAME/FIRST-LAST.claim  who fits the batch (Ray node, pid); found again: fitted twice
    OUTPUT/_parts/NAME/FIRST-LAST.tar    the fitted samples of one batch of one shard
    OUTPUT/_parts/NAME/FIRST-LAST.json   their records (key, error, notes, metrics); written after
                                         the tar, so a part exists once its JSON does

Every fitting actor writes the parts of its own batches (a retried batch rewrites the same part),
then lists the shard's parts: once their index ranges span the shard it reads their records, and
when those cover all of its samples it writes the shard's `_stats` record and the shard itself, its
parts' bytes copied back to back in sample order (atomic: the tar appears whole or not at all;
parts that overlap, after a rerun batched differently, are merged sample by sample instead), and
removes the parts. Two actors that finish a shard's last parts
at once both commit the same bytes; the one that finds the parts gone leaves it to the other. No
process sees more than its own batches and one shard's parts, one part at a time; a rerun after a
kill reads which samples the parts already cover and fits only the rest (resume by batch).

Why not Ray Data's writers (`Dataset.write_webdataset`): they write one file per block under names
Ray chooses, so a source shard's samples would be spread over files named by block, no file
would be known complete for a shard, and a rerun could not tell which samples were done.
"""

from __future__ import annotations

import logging
from collections import Counter

from splatclip.fit.report import shard_stats
from splatclip.pipelines import layout
from splatclip.platform import storage
from splatclip.platform.shards import ShardError, read_samples, write_shard
from splatclip.platform.specs import FitSpec

log = logging.getLogger(__name__)
PART_EXTS = ("splats.npy", "json", "txt", "cls", "teacher.npy")


def part_name(rows: list[dict]) -> str:
    indices = [r["index"] for r in rows]
    return f"{min(indices):08d}-{max(indices):08d}"


def claim(spec: FitSpec, shard: str, rows: list[dict], holder: dict) -> bool:
    """Mark one batch's rows of one shard as being fitted by `holder` (a `.claim` beside where its
    part will go: the Ray node and process); returns whether it was marked before: Ray sent the
    batch again after losing the actor (or the node) that had it, or a killed job had it."""
    url = storage.join(layout.parts_dir(spec.output, shard), part_name(rows) + ".claim")
    again = storage.exists(url, spec.storage)
    storage.write_json(url, holder, spec.storage, spec.output)
    return again


def write_part(spec: FitSpec, shard: str, rows: list[dict], samples: list[dict]) -> None:
    """One batch's rows of one shard: the fitted samples, then their records (the part's marker)."""
    base = storage.join(layout.parts_dir(spec.output, shard), part_name(rows))
    with write_shard(base + ".tar", spec.storage, spec.output) as writer:
        for sample in samples:
            writer.write(sample)
        data_bytes = writer.tarstream.offset  # where the members end and the end-of-archive blocks begin
    storage.write_json(base + ".json", {"total": rows[0]["total"], "rows": rows, "data_bytes": data_bytes},
                       spec.storage, spec.output)


def part_names(spec: FitSpec, shard: str) -> list[str]:
    """The shard's parts written so far (those whose record exists), in sample order."""
    directory = layout.parts_dir(spec.output, shard)
    return [n.removesuffix(".json") for n in storage.listdir(directory, spec.storage) if n.endswith(".json")]


def may_cover(names: list[str], total: int) -> bool:
    """Whether the index ranges in the part names span 0..total-1: necessary for the parts to cover
    the shard, and known from one listing (a part's range can hold gaps, so the records decide)."""
    reached = -1
    for first, last in sorted(tuple(map(int, n.split("-"))) for n in names):
        if first > reached + 1:
            return False
        reached = max(reached, last)
    return reached >= total - 1


def part_records(spec: FitSpec, shard: str, names: list[str]) -> tuple[dict[int, dict], dict[str, dict], int | None]:
    """({sample index: its record}, {part name: its record}, the shard's sample count) of the named
    parts, in sample order (the first part's record wins where two overlap)."""
    directory = layout.parts_dir(spec.output, shard)
    records: dict[int, dict] = {}
    parts: dict[str, dict] = {}
    total = None
    for name in sorted(names):
        try:
            part = storage.read_json(storage.join(directory, name + ".json"), spec.storage)
        except FileNotFoundError:  # committed and removed meanwhile
            continue
        total, parts[name] = part["total"], part
        for row in part["rows"]:
            records.setdefault(row["index"], {**row, "part": name})
    return records, parts, total


def commit_if_complete(spec: FitSpec, shard: str, total: int) -> dict | None:
    """Commit the shard of `total` samples when its parts cover all of them; its record, or None.
    Each call lists the parts; their records are read only once the names' ranges span the shard."""
    names = part_names(spec, shard)
    if not may_cover(names, total):
        return None
    records, parts, total = part_records(spec, shard, names)
    if total is None or set(records) != set(range(total)):
        return None
    rows = [records[i] for i in range(total)]
    stats = shard_stats(shard, rows)
    try:
        storage.write_json(layout.stats_url(spec.output, shard), stats, spec.storage, spec.output)
        used = Counter(r["part"] for r in rows)
        if all(used[name] == len(part["rows"]) for name, part in parts.items()):  # no two parts overlap
            concatenate(spec, shard, parts)
        else:
            merge(spec, shard, parts, rows)
    except (FileNotFoundError, ShardError):  # another actor committed it and removed the parts first
        if storage.exists(layout.output_url(spec.output, shard), spec.storage):
            return None
        raise
    directory = layout.parts_dir(spec.output, shard)
    # the parts used, and every claim (those of batches a killed job never wrote too); not a part
    # written meanwhile by a batch Ray sent again, nor a temporary file of a write in progress
    remove_files(spec, directory, [n for n in storage.listdir(directory, spec.storage) if not n.startswith(".")
                                   and (n.endswith(".claim") or n.rsplit(".", 1)[0] in parts)])
    log.info("committed %s: %d fitted, %d failed", layout.shard_name(shard), stats["fitted"], len(stats["errors"]))
    return stats


def concatenate(spec: FitSpec, shard: str, parts: dict[str, dict]) -> None:
    """The shard as its parts' members back to back (bytes copied, nothing parsed), then the
    end-of-archive blocks: valid because each part is a tar of whole members."""
    directory = layout.parts_dir(spec.output, shard)
    with storage.atomic_write(layout.output_url(spec.output, shard), spec.storage, spec.output) as out:
        for name, part in parts.items():
            left = part["data_bytes"]
            with storage.open_read(storage.join(directory, name + ".tar"), spec.storage) as src:
                while left > 0:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise FileNotFoundError(f"part {name} of {layout.shard_name(shard)} ends early")
                    out.write(chunk)
                    left -= len(chunk)
        out.write(b"\0" * 1024)


def merge(spec: FitSpec, shard: str, parts: dict[str, dict], rows: list[dict]) -> None:
    """The shard from overlapping parts (a rerun batched differently): each sample from the first
    part that holds it, parts read one at a time in sample order."""
    directory = layout.parts_dir(spec.output, shard)
    with write_shard(layout.output_url(spec.output, shard), spec.storage, spec.output) as writer:
        for name in parts:
            wanted = {r["key"] for r in rows if r["part"] == name and not r["error"]}
            for sample in read_samples(storage.join(directory, name + ".tar"), spec.storage, spec.limits):
                if sample["__key__"] in wanted:
                    writer.write({k: v for k, v in sample.items() if k in PART_EXTS or k == "__key__"})


def covered(spec: FitSpec, shard: str) -> set[int]:
    """Sample indices of the shard that earlier parts already hold."""
    return set(part_records(spec, shard, part_names(spec, shard))[0])


def sweep(spec: FitSpec, shards: list[str], done: set[str]) -> int:
    """Remove what killed processes left in the shards' parts folders: the hidden temporary file of a
    write that never finished (storage.atomic_write's `.NAME.UUID.part`) in every folder, and all of a
    committed shard's (`done`) folder. Only under the output's lease, when nothing else writes there:
    a live writer's temporary file looks the same. Returns how many files it removed."""
    removed, present = 0, set(storage.listdir(storage.join(spec.output, "_parts"), spec.storage))
    for shard in shards:
        directory = layout.parts_dir(spec.output, shard)
        if directory.rsplit("/", 1)[-1] not in present:  # one listing of _parts, not one per shard
            continue
        removed += remove_files(spec, directory, [n for n in storage.listdir(directory, spec.storage) if shard in done
                                                  or (n.startswith(".") and n.endswith(".part"))])
    return removed


def remove_files(spec: FitSpec, directory: str, names: list[str]) -> int:
    """Remove the named files of a parts folder (one gone already is skipped); how many it removed."""
    removed = 0
    for name in names:
        try:
            storage.remove(storage.join(directory, name), spec.storage, spec.output)
            removed += 1
        except FileNotFoundError:  # another actor's commit removed it first
            pass
    return removed
