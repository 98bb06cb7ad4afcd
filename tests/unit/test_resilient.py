"""One bad image costs one image: failing batches are split and retried, non-finite results are
caught per image, out-of-memory errors retry smaller before anything is recorded."""

import numpy as np
import torch
from skimage import data

from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop
from splatclip.fitting.resilient import Failure, fit_images, split_on_failure
from splatclip.platform.specs import FitParams

CFG = FitParams(gaussians=16, iterations=3, size=16, compile=False)


def photos(n):
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    return torch.stack([clip_crop(getattr(data, names[i % 4])(), 16) for i in range(n)])


def test_split_on_failure_isolates_the_bad_index():
    calls, failed = [], {}

    def run(idx):
        calls.append(list(idx))
        if 5 in idx:
            raise ValueError("image 5 breaks the fitter")

    splits = split_on_failure(run, list(range(8)), lambda i, err: failed.setdefault(i, str(err)))
    assert failed == {5: "image 5 breaks the fitter"}
    done = sorted(i for c in calls for i in c if 5 not in c)
    assert done == [0, 1, 2, 3, 4, 6, 7]  # every other image ran, once
    assert splits == 3  # 8 -> 4 -> 2 -> 1


def test_one_image_that_raises_costs_only_itself():
    images = photos(6)
    images[2] = float("nan")  # the fake fitter below refuses it, as a real fault would

    def fragile(batch, cfg, source_bytes):
        if torch.isnan(batch).any():
            raise RuntimeError("a bad image in this batch")
        return fit_batch(batch, cfg, source_bytes)

    out = fit_images(images, CFG, list(range(6)), fit=fragile)
    assert [isinstance(o, Failure) for o in out] == [False, False, True, False, False, False]
    assert out[2].reason == "fit_failed" and "a bad image" in out[2].detail
    alone = fit_images(images[[4]], CFG, [4])[0]
    np.testing.assert_array_equal(out[4][0], alone[0])  # a retried image is fitted as it would be alone
    assert out[4][1]["source_bytes"] == 4


def test_non_finite_parameters_are_caught_per_image():
    def nan_for_one(batch, cfg, source_bytes):
        result = fit_batch(batch, cfg, source_bytes)
        result.splats.params[1, 0, 5] = float("nan")
        return result

    out = fit_images(photos(3), CFG, [1, 2, 3], fit=nan_for_one)
    assert [o.reason if isinstance(o, Failure) else "ok" for o in out] == ["ok", "non_finite", "ok"]


def test_out_of_memory_retries_smaller_batches_first():
    sizes = []

    def small_memory(batch, cfg, source_bytes):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fit_batch(batch, cfg, source_bytes)

    out = fit_images(photos(8), CFG, [0] * 8, fit=small_memory)
    assert not any(isinstance(o, Failure) for o in out)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]

    def never_fits(batch, cfg, source_bytes):
        raise MemoryError()

    out = fit_images(photos(2), CFG, [0, 0], fit=never_fits)
    assert [o.reason for o in out] == ["out_of_memory", "out_of_memory"]
