"""The fit job's distributed commit: fitted rows are written where they are fitted, as parts, and a
shard is committed whole once its parts cover every one of its samples.

    OUTPUT/_parts/NAME/FIRST-LAST.tar    the fitted samples of one batch of one shard
    OUTPUT/_parts/NAME/FIRST-LAST.json   their records (key, error, notes, metrics); written after
                                         the tar, so a part exists once its JSON does

Every fitting actor writes the parts of its own batches (a retried batch rewrites the same part),
then looks at the shard's part records: when they cover all of its samples it writes the shard's
`_stats` record and the shard itself, streamed from its parts in sample order (atomic: the tar
appears whole or not at all), and removes the parts. Two actors that finish a shard's last parts
at once both commit the same bytes; the one that finds the parts gone leaves it to the other. No
process sees more than its own batches and one shard's parts, one part at a time; a rerun after a
kill reads which samples the parts already cover and fits only the rest (resume by batch).

Why not Ray Data's writers (`Dataset.write_webdataset`): they write one file per block under names
Ray chooses, so a source shard's samples would be spread over files named by block, no file
would be known complete for a shard, and a rerun could not tell which samples were done.
"""

from __future__ import annotations

import logging

from splatclip.pipelines import layout
from splatclip.pipelines.fit_report import shard_stats
from splatclip.platform import storage
from splatclip.platform.shards import ShardError, read_samples, write_shard
from splatclip.platform.specs import FitSpec

log = logging.getLogger(__name__)
PART_EXTS = ("splats.npy", "json", "txt", "cls", "teacher.npy")


def part_name(rows: list[dict]) -> str:
    indices = [r["index"] for r in rows]
    return f"{min(indices):08d}-{max(indices):08d}"


def write_part(spec: FitSpec, shard: str, rows: list[dict], samples: list[dict]) -> None:
    """One batch's rows of one shard: the fitted samples, then their records (the part's marker)."""
    base = storage.join(layout.parts_dir(spec.output, shard), part_name(rows))
    with write_shard(base + ".tar", spec.storage) as writer:
        for sample in samples:
            writer.write(sample)
    storage.write_json(base + ".json", {"total": rows[0]["total"], "rows": rows}, spec.storage)


def part_records(spec: FitSpec, shard: str) -> tuple[dict[int, dict], list[str], int | None]:
    """({sample index: its record}, the part names in order, the shard's sample count) of the parts
    written so far (the first part's record wins where two overlap)."""
    directory = layout.parts_dir(spec.output, shard)
    names = [n.removesuffix(".json") for n in storage.listdir(directory, spec.storage) if n.endswith(".json")]
    records: dict[int, dict] = {}
    total = None
    for name in sorted(names):
        try:
            part = storage.read_json(storage.join(directory, name + ".json"), spec.storage)
        except FileNotFoundError:  # committed and removed meanwhile
            continue
        total = part["total"]
        for row in part["rows"]:
            records.setdefault(row["index"], {**row, "part": name})
    return records, sorted(names), total


def commit_if_complete(spec: FitSpec, shard: str) -> dict | None:
    """Commit the shard when its parts cover all of its samples; its record, or None."""
    records, names, total = part_records(spec, shard)
    if total is None or set(records) != set(range(total)):
        return None
    rows = [records[i] for i in range(total)]
    directory = layout.parts_dir(spec.output, shard)
    stats = shard_stats(shard, rows)
    try:
        storage.write_json(layout.stats_url(spec.output, shard), stats, spec.storage)
        with write_shard(layout.output_url(spec.output, shard), spec.storage) as writer:
            for name in names:  # in sample order, one part in memory at a time
                wanted = {r["key"] for r in rows if r["part"] == name and not r["error"]}
                for sample in read_samples(storage.join(directory, name + ".tar"), spec.storage, spec.limits):
                    if sample["__key__"] in wanted:
                        writer.write({k: v for k, v in sample.items() if k in PART_EXTS or k == "__key__"})
    except (FileNotFoundError, ShardError):  # another actor committed it and removed the parts first
        if storage.exists(layout.output_url(spec.output, shard), spec.storage):
            return None
        raise
    for name in names:
        for ext in (".json", ".tar"):
            try:
                storage.remove(storage.join(directory, name + ext), spec.storage)
            except FileNotFoundError:
                pass
    log.info("committed %s: %d fitted, %d failed", layout.shard_name(shard), stats["fitted"], len(stats["errors"]))
    return stats


def covered(spec: FitSpec, shard: str) -> set[int]:
    """Sample indices of the shard that earlier parts already hold."""
    return set(part_records(spec, shard)[0])
