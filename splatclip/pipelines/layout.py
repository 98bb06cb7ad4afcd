"""What a splat shard directory holds, in one place for the fit job, training and evaluation.

    OUTPUT/NAME.tar            one splat shard per source shard: KEY.splats.npy, KEY.json, KEY.txt,
                               KEY.cls, KEY.teacher.npy (source members pass through cleaned)
    OUTPUT/_stats/NAME.json    its record: counts, failed samples and notes with key and reason
    OUTPUT/_parts/NAME/        fitted batches of a shard not yet committed (see splatclip.fit.parts)
    OUTPUT/_fit.json           the fit settings every shard of the directory was made with
    OUTPUT/_summary.json       the last run's summary; _SUCCESS.json once every input is done

NAME is the source shard's file name with any compression suffix made `.tar` (a.tar.gz -> a.tar).
"""

from __future__ import annotations

import posixpath

from splatclip.platform import storage

METADATA_EXTS = ("txt", "cls", "json")
SETTINGS = "_fit.json"
SUMMARY = "_summary.json"
_COMPRESSED = {".tar.gz": ".tar", ".tgz": ".tar", ".tar.bz2": ".tar", ".tar.xz": ".tar"}


def shard_name(url: str) -> str:
    """The output name of a source shard (its file name, compression suffix made .tar)."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix, plain in _COMPRESSED.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + plain
    return name


def output_url(output: str, shard: str) -> str:
    return storage.join(output, shard_name(shard))


def stats_url(output: str, shard: str) -> str:
    return storage.join(output, "_stats", shard_name(shard).removesuffix(".tar") + ".json")


def parts_dir(output: str, shard: str) -> str:
    return storage.join(output, "_parts", shard_name(shard).removesuffix(".tar"))


def stats_beside(splat_shard: str) -> str:
    """The `_stats` record of a splat shard, from the shard's own URL."""
    directory = splat_shard.rsplit("/", 1)[0] if "/" in splat_shard else "."
    return stats_url(directory, splat_shard)


def class_id(data: bytes) -> int | None:
    """A `.cls` member as a class id (a non-negative int below 2**31), or None."""
    try:
        label = int(data.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return None
    return label if 0 <= label < 2**31 else None
