"""Training and evaluation samples from shards: splat shards (the fit job's output) or image
shards (for the RGB encoder), decoded one sample at a time, with bad samples skipped and counted.
Splat shards can be joined with their source image shards (same shard name, same keys) when a
teacher model embeds the images during training.

The stream is deterministic for a (seed, epoch): shards are shuffled with that seed and split
between workers, so a resumed worker regenerates the same order and skips what it already used.

Shards are untrusted even when this project wrote them: every sample is checked before it can reach
a model (splat count and value ranges, teacher embedding shape and finiteness, class id, caption)
and a bad one is skipped and counted by reason, never raised.

Three small records travel whole instead of loose arguments: `SampleFormat` (what a usable sample is
for one model), `ShardSet` (what to read, and how) and `WorkerShare` (which part of it one worker reads).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from splatclip import splats
from splatclip.fitting.images import IMAGE_EXTS, ImageError, clip_crop, decode, image_member
from splatclip.pipelines.layout import class_id, stats_beside
from splatclip.platform import storage
from splatclip.platform.shards import ShardError, problems, read_samples
from splatclip.platform.specs import DEFAULT_LIMITS, ShardLimits, StorageSpec

log = logging.getLogger(__name__)
MAX_CAPTION_CHARS = 4096  # far beyond any text tower's context; longer captions are cut before tokenizing
# Splat values a fitted image can hold: positions near the image, positive scales under ten image
# sizes, colors (opacity folded in) far from float16's limit. Outside them a sample is corrupt.
POSITION_RANGE = (-1.0, 2.0)
MAX_SCALE = 10.0
MAX_COLOR = 1000.0


@dataclass(frozen=True)
class SampleFormat:
    """What a usable sample is for one model, built once from a job's spec and passed whole."""

    encoder: str = "splat"  # "splat": the sample's splats [n, 8]; "rgb": its image [3, S, S]
    image_size: int = 224  # S: the model's input size (the rgb encoder's crop)
    need_text: bool = True  # a sample without a caption is skipped (training); evaluation needs none
    classes: int | None = None  # a label is required, below this count (zero-shot evaluation)
    source_size: int | None = None  # also carry the joined source image at this size (a teacher embeds it)
    # how its source images are made square, grounded, cleared and stroked (`images.crop`'s frame, ground, clutter, stroke;
    # `layout.view_of`): as its splats' were; {}: crop's defaults
    view: Mapping[str, str] = field(default_factory=dict)
    embed_dim: int | None = None  # a stored teacher embedding must have this size
    limits: ShardLimits = field(default_factory=ShardLimits)


@dataclass(frozen=True)
class ShardSet:
    """Shards to read: their URLs, how to reach them, and the figures the driver found for them."""

    urls: tuple[str, ...]
    storage: StorageSpec | None = None
    sources: Mapping[str, str] | None = None  # splat shard URL -> its source image shard (same name and keys)
    counts: Mapping[str, int] | None = None  # samples per shard (`count_samples`), for the steps of an epoch
    fit: Mapping | None = None  # the fit settings the splat shards were made with (`layout.fit_recipe`), if one


@dataclass(frozen=True)
class WorkerShare:
    """Which samples one worker reads of a ShardSet in an epoch (see `worker_shards`)."""

    rank: int = 0
    world: int = 1
    seed: int = 0


@dataclass
class Skipped:
    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str, key: str) -> None:
        if not self.reasons[reason]:
            log.warning("skipping sample %s: %s (further ones are only counted)", key, reason)
        self.reasons[reason] += 1


def count_samples(shards: ShardSet, limits: ShardLimits = DEFAULT_LIMITS) -> dict[str, int]:
    """Samples in each shard: from the fit job's `_stats` record beside it when there is one and it
    is plausible, else by reading the shard (0 for a shard that cannot be read). The counts set the
    steps of an epoch, so a record that lies must not make one endless."""
    return {url: _count(shards, url, limits) for url in shards.urls}


def _count(shards: ShardSet, url: str, limits: ShardLimits) -> int:
    stats = stats_beside(url)
    try:
        if storage.exists(stats, shards.storage):
            fitted = storage.read_json(stats, shards.storage)["fitted"]
            if isinstance(fitted, int) and 0 <= fitted <= limits.max_shard_samples:
                return fitted
            log.warning("%s: its record's sample count %r is not plausible; counting the shard", url, fitted)
        return sum(1 for s in read_samples(url, shards.storage, limits, ()) if not problems(s))
    except (ShardError, ValueError, KeyError, TypeError) as err:
        log.warning("cannot count the samples of %s: %s", url, err)
        return 0


def decode_image(sample: dict, size: int, limits: ShardLimits = DEFAULT_LIMITS, **view: str) -> torch.Tensor | None:
    """The sample's image at [3, size, size] in [0, 1], made square, grounded, cleared and stroked as `view` says
    (`images.crop`); None when missing or bad."""
    ext = image_member(sample)
    try:
        return clip_crop(decode(sample[ext], limits), size, **view) if ext else None
    except ImageError:
        return None


def splat_problem(arr: np.ndarray, limits: ShardLimits) -> str | None:
    """Why a (format-valid) splat array may not reach a model, or None."""
    if len(arr) == 0:
        return "no_live_gaussians"
    if len(arr) > limits.max_gaussians:
        return "too_many_gaussians"
    values = arr.astype(np.float32)
    lo, hi = POSITION_RANGE
    if ((values[:, :2] < lo) | (values[:, :2] > hi)).any() or (np.abs(values[:, 2:5]) > MAX_SCALE).any() \
            or (np.abs(values[:, 5:8]) > MAX_COLOR).any():
        return "splats_out_of_range"
    return None


def teacher_embedding(data: bytes, dim: int | None) -> np.ndarray | None:
    """A stored teacher embedding as float32 [D], or None unless it is a finite vector of `dim`."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:
        return None
    if arr.dtype.kind != "f" or arr.ndim != 1 or (dim is not None and arr.shape[0] != dim):
        return None
    arr = arr.astype(np.float32)
    return arr if np.isfinite(arr).all() and np.abs(arr).max(initial=0) < 1e4 else None


def with_sources(raws, source_url: str, shards: ShardSet, limits: ShardLimits = DEFAULT_LIMITS):
    """Splat samples of one shard, each paired with its source sample (or None) from the image
    shard `source_url`, matched by key. The fit job keeps the source order, so both shards are
    read once side by side; source samples passed over on the way are held until asked for (a key
    with no source holds the rest of the image shard in memory)."""
    sources = readable(read_samples(source_url, shards.storage, limits, IMAGE_EXTS), source_url)
    ahead: dict[str, dict] = {}
    for raw in raws:
        key = raw["__key__"]
        for source in sources:
            ahead[source["__key__"]] = source
            if source["__key__"] == key:
                break
        yield raw, ahead.pop(key, None)


def decode_sample(sample: dict, fmt: SampleFormat, skipped: Skipped) -> dict | None:
    """A raw sample -> {"splats" [n, 8] | "image" [3, S, S], "text", "teacher", "label"}, or None.
    A stored teacher embedding must be a finite vector of `fmt.embed_dim` (when given)."""
    key, limits = sample["__key__"], fmt.limits
    out = {}
    if fmt.encoder == "splat":
        if "splats.npy" not in sample:
            skipped.add("no_splats", key)
            return None
        try:
            out["splats"] = splats.from_bytes(sample["splats.npy"], key)
        except splats.SplatFormatError:
            skipped.add("corrupt_splats", key)
            return None
        why = splat_problem(out["splats"], limits)
        if why:
            skipped.add(why, key)
            return None
    else:
        out["image"] = decode_image(sample, fmt.image_size, limits, **fmt.view)
        if out["image"] is None:
            skipped.add("bad_image", key)
            return None
    out["text"] = sample.get("txt", b"")[: 4 * MAX_CAPTION_CHARS].decode("utf-8", "replace").strip()[:MAX_CAPTION_CHARS]
    if "teacher.npy" in sample:
        out["teacher"] = teacher_embedding(sample["teacher.npy"], fmt.embed_dim)
        if out["teacher"] is None:
            skipped.add("bad_teacher", key)
            return None
    out["class_id"] = class_id(sample.get("cls", b""))
    if fmt.classes is not None:
        if out["class_id"] is None or out["class_id"] >= fmt.classes:
            skipped.add("bad_class", key)
            return None
        out["label"] = out["class_id"]
    return out


def worker_shards(urls, share: WorkerShare, epoch: int) -> list[str]:
    """This worker's shards for an epoch: a seeded shuffle, then every world-th shard."""
    order = list(urls)
    random.Random(share.seed * 1_000_003 + epoch).shuffle(order)
    return order[share.rank :: share.world] if len(order) >= share.world else order


def readable(samples, url: str):
    """A shard's samples, ending (with a warning) instead of raising when the shard cannot be read."""
    try:
        yield from samples
    except ShardError as err:
        log.warning("shard %s is unreadable: %s", url, err)


def raw_pairs(shards: ShardSet, share: WorkerShare, epoch: int, limits: ShardLimits = DEFAULT_LIMITS):
    """This worker's raw samples for one epoch, in the deterministic order, each with its source
    sample (`shards.sources`) or None. With fewer shards than workers every worker reads them all
    and keeps every world-th sample."""
    by_sample = len(shards.urls) < share.world
    i = 0
    for url in worker_shards(shards.urls, share, epoch):
        raws = readable(read_samples(url, shards.storage, limits), url)
        pairs = with_sources(raws, shards.sources[url], shards, limits) if shards.sources \
            else ((raw, None) for raw in raws)
        for raw, source in pairs:
            i += 1
            if not by_sample or (i - 1) % share.world == share.rank:
                yield raw, source


def check_sample(raw: dict, source: dict | None, fmt: SampleFormat, skipped: Skipped) -> dict | None:
    """A raw sample decoded, or None (skipped and counted) when the shard reader found a problem with
    it or it fails its checks. With `fmt.source_size` it also carries its source "image" [3, size,
    size]; a sample whose source is missing or undecodable is skipped."""
    lost = [reason for member, reason, _ in problems(raw) if not member]
    if lost:
        skipped.add(lost[0], raw["__key__"])
        return None
    s = decode_sample(raw, fmt, skipped)
    if s is None:
        return None
    if fmt.need_text and not s["text"]:
        skipped.add("empty_caption", raw["__key__"])
        return None
    if fmt.source_size is not None:
        s["image"] = decode_image(source, fmt.source_size, fmt.limits, **fmt.view) if source is not None else None
        if s["image"] is None:
            skipped.add("bad_source_image" if source is not None else "no_source_image", raw["__key__"])
            return None
    return s


def stream(shards: ShardSet, fmt: SampleFormat, skipped: Skipped, share: WorkerShare = WorkerShare(),
           epoch: int = 0):
    """Valid samples of this worker for one epoch, in a deterministic order (`raw_pairs`, then
    `check_sample`), decoded in this process."""
    for raw, source in raw_pairs(shards, share, epoch, fmt.limits):
        s = check_sample(raw, source, fmt, skipped)
        if s is not None:
            yield s


def caption_id(text: str) -> int:
    """A 63-bit id of a caption, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def positive_id(sample: dict, positives: str) -> int:
    """Equal for samples the contrastive loss treats as positives of each other: the class (as a
    negative number) with positives="class" when the sample has one, else the caption."""
    if positives == "class" and sample.get("class_id") is not None:
        return -1 - sample["class_id"]
    return caption_id(sample["text"])


def collate(samples: list[dict], tokenizer=None, image_size: int = 224, positives: str = "caption") -> dict:
    """Pad splats to the largest n with a mask; stack images, teachers, labels; tokenize text (or stack
    the samples' own tokens) with positive ids, so the CLIP loss can tell which pairs match: see `positive_id`)."""
    out = {}
    if "splats" in samples[0]:
        batch = splats.Splats.from_arrays([s["splats"] for s in samples], image_size, image_size)
        out["params"], out["mask"] = batch.params, batch.mask
    if all("image" in s for s in samples):
        out["images"] = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    if "tokens" in samples[0]:  # tokenized a chunk at a time by the training ingest
        out["tokens"] = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    elif tokenizer is not None:
        out["tokens"] = tokenizer([s["text"] for s in samples])
    if "tokens" in out:
        out["positive_ids"] = torch.tensor([positive_id(s, positives) for s in samples])  # [b] int64
    if all("teacher" in s for s in samples):
        out["teacher"] = torch.from_numpy(np.stack([s["teacher"] for s in samples]).astype(np.float32))
    if all("label" in s for s in samples):
        out["labels"] = torch.tensor([s["label"] for s in samples])
    return out
