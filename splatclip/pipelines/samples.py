"""Training and evaluation samples from shards: splat shards (the fit job's output) or image
shards (for the RGB encoder), decoded one sample at a time, with bad samples skipped and counted.
Splat shards can be joined with their source image shards (same shard name, same keys) when a
teacher model embeds the images during training.

The stream is deterministic for a (seed, epoch): shards are shuffled with that seed and split
between workers, so a resumed worker regenerates the same order and skips what it already used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from splatclip import splats
from splatclip.fitting.images import ImageError, clip_crop, decode
from splatclip.platform import storage
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import StorageSpec

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Skipped:
    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str, key: str) -> None:
        if not self.reasons[reason]:
            log.warning("skipping sample %s: %s (further ones are only counted)", key, reason)
        self.reasons[reason] += 1


def count_samples(url: str, spec: StorageSpec | None) -> int:
    """Samples in a shard: from the fit job's `_stats` record beside it when there is one."""
    directory, name = url.rsplit("/", 1)
    stats = storage.join(directory, "_stats", name.removesuffix(".tar") + ".json")
    if storage.exists(stats, spec):
        return int(storage.read_json(stats, spec)["fitted"])
    return sum(1 for _ in read_samples(url, spec))


def decode_image(sample: dict, size: int) -> torch.Tensor | None:
    """The sample's image, CLIP-cropped to [3, size, size] in [0, 1]; None when missing or bad."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    try:
        return clip_crop(decode(sample[ext]), size) if ext else None
    except ImageError:
        return None


def with_sources(raws, source_url: str, spec: StorageSpec | None):
    """Splat samples of one shard, each paired with its source sample (or None) from the image
    shard `source_url`, matched by key. The fit job keeps the source order, so both shards are
    read once side by side; source samples passed over on the way are held until asked for (a key
    with no source holds the rest of the image shard in memory)."""
    sources = read_samples(source_url, spec)
    ahead: dict[str, dict] = {}
    for raw in raws:
        key = raw["__key__"]
        for source in sources:
            ahead[source["__key__"]] = source
            if source["__key__"] == key:
                break
        yield raw, ahead.pop(key, None)


def decode_sample(sample: dict, kind: str, image_size: int, classes: int | None, skipped: Skipped) -> dict | None:
    """A raw sample -> {"splats" [n, 8] | "image" [3, S, S], "text", "teacher", "label"}, or None."""
    key = sample["__key__"]
    out = {}
    if kind == "splat":
        if "splats.npy" not in sample:
            skipped.add("no_splats", key)
            return None
        try:
            out["splats"] = splats.from_bytes(sample["splats.npy"], key)
        except splats.SplatFormatError:
            skipped.add("corrupt_splats", key)
            return None
        if len(out["splats"]) == 0:
            skipped.add("no_live_gaussians", key)
            return None
    else:
        out["image"] = decode_image(sample, image_size)
        if out["image"] is None:
            skipped.add("bad_image", key)
            return None
    out["text"] = sample.get("txt", b"").decode("utf-8", "replace").strip()
    if "teacher.npy" in sample:
        out["teacher"] = np.load(io.BytesIO(sample["teacher.npy"]), allow_pickle=False)
    if classes is not None:
        try:
            label = int(sample.get("cls", b"").decode().strip())
        except ValueError:
            label = -1
        if not 0 <= label < classes:
            skipped.add("bad_class", key)
            return None
        out["label"] = label
    return out


def worker_shards(shards: list[str], rank: int, world: int, seed: int, epoch: int) -> list[str]:
    """This worker's shards for an epoch: a seeded shuffle, then every world-th shard."""
    order = list(shards)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world] if len(order) >= world else order


def stream(shards, rank, world, seed, epoch, kind, image_size, spec, skipped, need_text=True, classes=None,
           sources: dict[str, str] | None = None, source_size: int = 224):
    """Valid samples of this worker for one epoch, in a deterministic order. With fewer shards
    than workers every worker reads them all and keeps every world-th sample. With `sources`
    (splat shard URL -> its image shard URL) each sample also carries its source "image"
    [3, source_size, source_size]; a sample whose source is missing or undecodable is skipped."""
    mine = worker_shards(shards, rank, world, seed, epoch)
    by_sample = len(shards) < world
    i = 0
    for url in mine:
        raws = read_samples(url, spec)
        pairs = with_sources(raws, sources[url], spec) if sources else ((raw, None) for raw in raws)
        for raw, source in pairs:
            i += 1
            if by_sample and (i - 1) % world != rank:
                continue
            if "__error__" in raw:
                skipped.add("unsafe_path", raw["__key__"])
                continue
            s = decode_sample(raw, kind, image_size, classes, skipped)
            if s is None:
                continue
            if need_text and not s["text"]:
                skipped.add("empty_caption", raw["__key__"])
                continue
            if sources:
                s["image"] = decode_image(source, source_size) if source is not None else None
                if s["image"] is None:
                    skipped.add("bad_source_image" if source is not None else "no_source_image", raw["__key__"])
                    continue
            yield s


def caption_id(text: str) -> int:
    """A 63-bit id of a caption, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def collate(samples: list[dict], tokenizer=None, image_size: int = 224) -> dict:
    """Pad splats to the largest n with a mask; stack images, teachers, labels; tokenize text (with
    caption ids, so the CLIP loss can tell copies of a caption)."""
    out = {}
    if "splats" in samples[0]:
        batch = splats.Splats.from_arrays([s["splats"] for s in samples], image_size, image_size)
        out["params"], out["mask"] = batch.params, batch.mask
    if all("image" in s for s in samples):
        out["images"] = torch.stack([s["image"] for s in samples])
    if tokenizer is not None:
        out["tokens"] = tokenizer([s["text"] for s in samples])
        out["caption_ids"] = torch.tensor([caption_id(s["text"]) for s in samples])
    if all("teacher" in s for s in samples):
        out["teacher"] = torch.from_numpy(np.stack([s["teacher"] for s in samples]).astype(np.float32))
    if all("label" in s for s in samples):
        out["labels"] = torch.tensor([s["label"] for s in samples])
    return out
