"""Pictures for people: side-by-side comparisons, error heat maps and contact sheets (uint8 RGB)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps

from splatclip import splats
from splatclip.cuda import render
from splatclip.fitting.images import IMAGE_EXTS, clip_crop, decode, image_member
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import DEFAULT_LIMITS, ShardLimits, StorageSpec

ERROR_SCALE = 0.25  # an absolute error of 0.25 (of the [0, 1] range) is the hottest color


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def error_map(render: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """Mean absolute error per pixel as an inferno heat map, [H, W, 3] uint8."""
    err = (render.clamp(0, 1) - original).abs().mean(0).cpu().numpy() / ERROR_SCALE
    return (colormaps["inferno"](np.clip(err, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


def comparison(original: torch.Tensor, render: torch.Tensor, gap: int = 4) -> np.ndarray:
    """original | render | error heat map, side by side."""
    return hstack([to_uint8(original), to_uint8(render), error_map(render, original)], gap)


def hstack(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    spacer = np.full((h, gap, 3), 255, np.uint8)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(spacer)
        parts.append(np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, 1)


def vstack(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    w = max(i.shape[1] for i in images)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(np.full((gap, w, 3), 255, np.uint8))
        parts.append(np.pad(im, ((0, 0), (0, w - im.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(parts, 0)


def contact_sheet(originals: list[torch.Tensor], renders: list[torch.Tensor], per_row: int = 8) -> np.ndarray:
    """Rows of originals, each with its renders beneath and the error maps below those."""
    rows = []
    for s in range(0, len(originals), per_row):
        o, r = originals[s : s + per_row], renders[s : s + per_row]
        rows.append(hstack([to_uint8(x) for x in o]))
        rows.append(hstack([to_uint8(x) for x in r]))
        rows.append(hstack([error_map(b, a) for a, b in zip(o, r)]))
    return vstack(rows, gap=8)


def fitted_pairs(source: str, fitted: str, size: int, count: int, storage: StorageSpec | None = None,
                 limits: ShardLimits = DEFAULT_LIMITS, **view: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Up to `count` (original made square, grounded, cleared and stroked as fitted (`view`: `images.crop`'s) [3, S, S],
    render of its splats [3, S, S]) pairs from a source shard and its splat shard."""
    splat_bytes = {s["__key__"]: s["splats.npy"] for s in read_samples(fitted, storage, limits) if "splats.npy" in s}
    originals, renders = [], []
    for sample in read_samples(source, storage, limits, IMAGE_EXTS):
        ext = image_member(sample)
        if len(originals) == count:
            break
        if sample["__key__"] not in splat_bytes or ext is None:
            continue
        originals.append(clip_crop(decode(sample[ext], limits), size, **view))
        batch = splats.Splats.from_arrays([splats.from_bytes(splat_bytes[sample["__key__"]])], size, size)
        with torch.no_grad():
            renders.append(render(batch.params, size, size, batch.mask)[0])
    return originals, renders
