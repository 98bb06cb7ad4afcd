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

import logging
import posixpath

from splatclip.platform import storage
from splatclip.platform.secrets import redact
from splatclip.platform.specs import FitParams, StorageSpec

log = logging.getLogger(__name__)

METADATA_EXTS = ("txt", "cls", "json")
SETTINGS = "_fit.json"
SPEED_ONLY = {"backend", "compile"}  # fit settings that change how fast a sample is made, not what it holds
SUMMARY = "_summary.json"
_COMPRESSED = {".tar.gz": ".tar", ".tgz": ".tar", ".tar.bz2": ".tar", ".tar.xz": ".tar"}


def shard_name(url: str) -> str:
    """The output name of a source shard (its file name, compression suffix made .tar)."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix, plain in _COMPRESSED.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + plain
    return name


def directory_of(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def read_settings(output: str, spec: StorageSpec | None = None) -> dict | None:
    """The settings recorded in `output`'s SETTINGS ({"fit": ..., "teacher": ...}), or None when it has
    none. A fit setting added since the record was written reads as its default: it was fitted as the
    default does."""
    url = storage.join(output, SETTINGS)
    if not storage.exists(url, spec):
        return None
    recorded = storage.read_json(url, spec)["settings"]
    return {**recorded, "fit": {**FitParams().model_dump(exclude=SPEED_ONLY), **recorded.get("fit", {})}}


def settings_changes(before: dict, now: dict, prefix: str = "",
                     sides: tuple[str, str] = ("in the output", "in this spec")) -> list[str]:
    """'fit.gaussians: 49 in the output, 16 in this spec' for each setting that differs (nested dicts
    by their dotted keys; `sides` names where each value is from)."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_changes(a, b, f"{prefix}{key}.", sides)
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} {sides[0]}, {b!r} {sides[1]}")
    return out


VIEW = ("frame", "ground", "clutter", "stroke")  # the fit settings that say how a source image became the square that was fitted


def view_of(recipe: dict | FitParams | None) -> dict[str, str]:
    """How the images of splats fitted with `recipe` (a record's settings, a splat file's JSON, or
    FitParams) were made square, grounded, cleared and stroked ({"frame", "ground", "clutter", "stroke"}, the keyword
    arguments of `images.crop`; FitParams' defaults where no recipe is known): whatever reads the source
    images beside the splats reads them so."""
    if isinstance(recipe, FitParams):
        recipe = recipe.model_dump(include=set(VIEW))
    return {k: (recipe or {}).get(k, FitParams.model_fields[k].default) for k in VIEW}


def fit_recipe(shards: list[str], spec: StorageSpec | None = None) -> dict | None:
    """The fit settings splat shards were made with (FitParams' fields, less the speed-only ones), read
    from their directories' records; None, with a warning, when a directory has no readable record or
    two directories were fitted differently: a model trained on them can name no one recipe."""
    recipes = {}
    for directory in sorted({directory_of(url) for url in shards}):
        try:
            fit = (read_settings(directory, spec) or {}).get("fit")
            recipes[directory] = FitParams.model_validate(fit).model_dump(exclude=SPEED_ONLY) if fit else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # a damaged record
            log.warning("%s: unreadable fit record (%s)", redact(storage.join(directory, SETTINGS)), redact(str(err))[:200])
            recipes[directory] = None
    found = list(recipes.values())
    if not found or any(r is None for r in found) or any(r != found[0] for r in found):
        unrecorded = [d for d, r in recipes.items() if r is None]
        log.warning("the splat shards %s: the model records no fit recipe",
                    f"of {redact(unrecorded[0])} have no fit record" if unrecorded else "were fitted with other settings")
        return None
    return found[0]


def output_url(output: str, shard: str) -> str:
    return storage.join(output, shard_name(shard))


def stats_url(output: str, shard: str) -> str:
    return storage.join(output, "_stats", shard_name(shard).removesuffix(".tar") + ".json")


def parts_dir(output: str, shard: str) -> str:
    return storage.join(output, "_parts", shard_name(shard).removesuffix(".tar"))


def stats_beside(splat_shard: str) -> str:
    """The `_stats` record of a splat shard, from the shard's own URL."""
    return stats_url(directory_of(splat_shard), splat_shard)


def class_id(data: bytes) -> int | None:
    """A `.cls` member as a class id (a non-negative int below 2**31), or None."""
    try:
        label = int(data.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return None
    return label if 0 <= label < 2**31 else None
