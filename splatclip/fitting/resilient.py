"""Batches that survive their worst image: a failing batch is split in halves and retried, down to
single images, so one image that breaks the fitter (or runs it out of memory) costs that image
alone. Out-of-memory errors free the allocator's cache before the smaller retries. Results that
are not finite are caught per image.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from splatclip.fitting.fitter import FitResult, fit_batch
from splatclip.platform.specs import FitParams
from splatclip.splats import SplatFormatError

log = logging.getLogger(__name__)


@dataclass
class Failure:
    reason: str  # fit_failed, out_of_memory, non_finite
    detail: str


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(err).lower()


def split_on_failure(run: Callable[[list[int]], None], indices: list[int],
                     fail: Callable[[int, BaseException], None]) -> int:
    """run(indices); when it raises, run each half, recursively; a single index that still raises
    goes to fail(i, error). Returns how many times a batch was split."""
    try:
        run(indices)
        return 0
    except Exception as err:
        if is_out_of_memory(err):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if len(indices) == 1:
            fail(indices[0], err)
            return 0
        log.warning("a batch of %d failed (%s: %s); retrying it in halves", len(indices), type(err).__name__,
                    str(err)[:200])
        half = len(indices) // 2
        return 1 + split_on_failure(run, indices[:half], fail) + split_on_failure(run, indices[half:], fail)


def fit_images(images: torch.Tensor, cfg: FitParams, source_bytes: Sequence[int],
               fit: Callable[..., FitResult] = fit_batch) -> list[tuple[np.ndarray, dict] | Failure]:
    """images [B, 3, H, W] -> per image (float16 splats [n, 8], metrics) or a Failure."""
    out: list[tuple[np.ndarray, dict] | Failure | None] = [None] * len(images)

    def run(idx: list[int]) -> None:
        result = fit(images[idx], cfg, [source_bytes[i] for i in idx])
        for j, i in enumerate(idx):
            metrics = result.metrics[j]
            try:
                arr = result.splats.encode(j)  # refuses NaN/inf (float16 overflow included)
            except SplatFormatError as err:
                out[i] = Failure("non_finite", str(err))
                continue
            if not all(math.isfinite(metrics[k]) for k in ("psnr", "ssim")):
                out[i] = Failure("non_finite", f"psnr {metrics['psnr']}, ssim {metrics['ssim']}")
                continue
            out[i] = (arr, metrics)

    def fail(i: int, err: BaseException) -> None:
        reason = "out_of_memory" if is_out_of_memory(err) else "fit_failed"
        out[i] = Failure(reason, f"{type(err).__name__}: {err}"[:500])

    split_on_failure(run, list(range(len(images))), fail)
    return out  # type: ignore[return-value]
