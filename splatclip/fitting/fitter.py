"""The batched fitter: one Adam optimizer over a whole batch of images, B images of one size, each
with its own N Gaussians. The loss is a sum of per-image losses, so every image follows exactly the
path it would follow alone (Adam is elementwise).

Two things spend the work where it pays (docs/method.md, 'Fitting'):
- coarse to fine: the first `coarse` iterations (at most five sixths of them) render at half the
  image's size (splats are resolution-independent; the target is box-averaged to the same size), at
  about a third of a full-size step's cost; the last steps at full size add the detail a half-size
  image lacks;
- per-image stopping: with `target_psnr` (or `target_snr`, the error relative to the image's own
  signal, which fits an image with little ink as closely to its ink as one with much: `stop_db`),
  an image that reaches it at full size leaves the batch
  (its parameters and its Adam state are cut out), so a batch's step costs what its unfinished images
  do; `iterations` is then a ceiling. While coarse, an image is looked at full size every
  COARSE_CHECK steps once its half-size PSNR is near the target. An image's result is the one it
  would have alone.

With `prefilter`, what is fitted is each image blurred by a share of its grid's square (`prefilter_px`):
hard edges that a few Gaussians cannot draw no longer decide what the splats are; the metrics stay
against the image as given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from splatclip.cuda import render
from splatclip.fitting.init import grid_shape, ink_box, ink_init, random_init, structured_init
from splatclip.fitting.metrics import mse, psnr, psnr_from_mse, ssim
from splatclip.fitting.prune import prune_mask
from splatclip.platform.specs import FitParams
from splatclip.splats import BYTES_PER_GAUSSIAN, Splats
from splatclip.warps import blur_images

log = logging.getLogger(__name__)

MIN_SCALE_PX = 0.1  # l11 and l22 never shrink below a tenth of a pixel
MIN_COARSE_PX = 32  # no coarse phase where half the shorter side would be smaller
COARSE_SHARE = 5 / 6  # at most this share of the iterations is coarse
COARSE_CHECK = 10  # with a target, coarse steps render at full size (no gradient) every this many to look
COARSE_NEAR_DB = 1.0  # at the images whose half-size PSNR is within this of the target (full size adds error)


@dataclass
class FitResult:
    splats: Splats  # float16-rounded parameters, the ones that get stored
    metrics: list[dict]  # one dict per image


def prune_steps(iterations: int) -> set[int]:
    """Pruning happens at half and three quarters of the run, then once more after the last step."""
    return {iterations // 2, (3 * iterations) // 4} - {0}


def resolution_schedule(iterations: int, height: int, width: int, coarse: int) -> list[tuple[int, int, int]]:
    """[(first iteration, height, width)] of each phase: `coarse` iterations (at most COARSE_SHARE of
    them) at half size, unless that is under MIN_COARSE_PX, then full size."""
    share = min(coarse, int(iterations * COARSE_SHARE)) if min(height, width) // 2 >= MIN_COARSE_PX else 0
    return ([(0, height // 2, width // 2)] if share else []) + [(share, height, width)]


def stop_db(images: torch.Tensor, cfg: FitParams) -> torch.Tensor | None:
    """images [B, 3, H, W] -> [B] the full-size PSNR at which each image stops, or None without a
    target: `target_psnr`; the PSNR at which the error is `target_snr` dB under the image's own mean
    square (at a peak of 1, PSNR = SNR - 10 log10(mean square)), so that a digit drawn smaller,
    thinner or fainter is fitted as closely to its ink as a large one; the higher of the two where
    both are set."""
    if cfg.target_psnr is None and cfg.target_snr is None:
        return None
    db = torch.full((len(images),), -torch.inf if cfg.target_psnr is None else cfg.target_psnr, device=images.device)
    if cfg.target_snr is not None:
        power = images.square().mean((1, 2, 3)).clamp(min=1e-10)  # [B]; a black image is fitted exactly at once
        db = torch.maximum(db, cfg.target_snr - 10 * torch.log10(power))
    return db


class Batch:
    """The images still being fitted: their leaves (positions, Cholesky factors, colors), masks,
    targets, the PSNR each stops at, original indices and the optimizer over them."""

    def __init__(self, init: torch.Tensor, images: torch.Tensor, cfg: FitParams):
        n = init.shape[1]
        cell = 1.0 / (n**0.5)  # a grid cell, in normalized units
        self.index = torch.arange(len(images), device=images.device)  # [b] into the caller's batch
        self.images = images  # [b, 3, H, W]
        self.stop_db = stop_db(images, cfg)  # [b] or None
        self.coarse: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> the images box-averaged to it
        self.mask = torch.ones(init.shape[:2], dtype=torch.bool, device=images.device)  # [b, N]
        self.leaves = [init[..., a:z].clone().requires_grad_() for a, z in ((0, 2), (2, 5), (5, 8))]
        self.opt = torch.optim.Adam([{"params": [leaf], "lr": lr} for leaf, lr in
                                     zip(self.leaves, (cfg.lr_position * cell, cfg.lr_cholesky * cell, cfg.lr_color))])

    @property
    def params(self) -> torch.Tensor:
        return torch.cat(self.leaves, -1)  # [b, N, 8]

    def target(self, h: int, w: int) -> torch.Tensor:
        """The images at (h, w) [b, 3, h, w]: themselves at their size, box-averaged (once) below it."""
        if (h, w) == tuple(self.images.shape[-2:]):
            return self.images
        if (h, w) not in self.coarse:
            self.coarse[h, w] = F.interpolate(self.images, size=(h, w), mode="area")
        return self.coarse[h, w]

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` [b] bool go on: leaves and Adam's moments cut to them (elementwise, so the rows
        kept move on exactly as before)."""
        leaves = [leaf.detach()[rows].clone().requires_grad_() for leaf in self.leaves]
        opt = torch.optim.Adam([{**{k: v for k, v in group.items() if k != "params"}, "params": [leaf]}
                                for group, leaf in zip(self.opt.param_groups, leaves)])
        for old, new in zip(self.leaves, leaves):
            state = self.opt.state.get(old)
            if state:
                opt.state[new] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][rows].clone(),
                                  "exp_avg_sq": state["exp_avg_sq"][rows].clone()}
        self.leaves, self.opt = leaves, opt
        self.index, self.images, self.mask = self.index[rows], self.images[rows], self.mask[rows]
        self.stop_db = None if self.stop_db is None else self.stop_db[rows]
        self.coarse = {size: images[rows] for size, images in self.coarse.items()}


def record(batch: Batch, rows: torch.Tensor, done: torch.Tensor, done_mask: torch.Tensor) -> None:
    """Write the batch's `rows` [b] bool (their parameters now, their masks) into the results."""
    done[batch.index[rows]] = batch.params.detach()[rows]
    done_mask[batch.index[rows]] = batch.mask[rows]


def stop(batch: Batch, rows: torch.Tensor, done: torch.Tensor, done_mask: torch.Tensor) -> Batch | None:
    """The images `rows` [b] bool leave the batch with the parameters they have; None when none is left."""
    if not rows.any():
        return batch
    record(batch, rows, done, done_mask)
    if rows.all():
        return None
    batch.keep(~rows)
    return batch


def coarse_check(batch: Batch, err: torch.Tensor | None, cfg: FitParams, done: torch.Tensor,
                 done_mask: torch.Tensor) -> Batch | None:
    """While coarse, the images near their target (half-size PSNR within COARSE_NEAR_DB of it, from
    the last step's `err` [b]; all of them before the first step) rendered at full size, where the
    target is measured, and those at it stopped. Each image's look depends on itself alone."""
    H, W = batch.images.shape[-2:]
    with torch.no_grad():
        near = torch.ones(len(batch.index), dtype=torch.bool, device=batch.images.device) if err is None else \
            psnr_from_mse(err.detach()) >= batch.stop_db - COARSE_NEAR_DB  # [b]
        if not near.any():
            return batch
        full = mse(render(batch.params[near], H, W, batch.mask[near], cfg.backend, cfg.compile), batch.images[near])
        reached = torch.zeros_like(near)
        reached[near] = psnr_from_mse(full) >= batch.stop_db[near]
    return stop(batch, reached, done, done_mask)


def prefilter_px(images: torch.Tensor, cfg: FitParams) -> torch.Tensor:
    """images [B, 3, H, W] -> [B] the sigma in pixels each is blurred by before fitting: `cfg.prefilter`
    of the longer side of the square its grid is laid over (the frame; with `init: ink` the box that
    holds its ink, so that a digit drawn at half the size is blurred half as much)."""
    B, _, H, W = images.shape
    if cfg.init != "ink":
        return images.new_full((B,), cfg.prefilter * max(H, W))
    rows, cols = grid_shape(cfg.gaussians, H, W)
    return images.new_tensor([cfg.prefilter * max(h, w) for _, _, h, w in (ink_box(image, rows, cols) for image in images)])


def fit_batch(images, cfg: FitParams, source_bytes: list[int] | None = None, progress: bool = False) -> FitResult:
    """images [B, 3, H, W] in [0, 1] -> fitted splats and per-image metrics (against `images`; the
    fit itself is to them blurred by `cfg.prefilter` pixels)."""
    start = time.perf_counter()
    B, _, H, W = images.shape
    n = cfg.gaussians
    torch.manual_seed(cfg.seed)
    fitted = images if cfg.prefilter == 0 else blur_images(images, prefilter_px(images, cfg))  # [B, 3, H, W]
    if cfg.init == "structured":
        init = structured_init(fitted, n, cfg.backend)
    elif cfg.init == "ink":
        init = ink_init(fitted, n, cfg.backend)
    else:
        init = random_init(fitted, n, cfg.seed)
    batch = Batch(init, fitted, cfg)
    done = init.detach().clone()  # [B, N, 8]: each image's parameters, written when it stops
    done_mask = torch.ones(B, n, dtype=torch.bool, device=images.device)  # [B, N]
    steps_run = torch.zeros(B, dtype=torch.long)
    min_l11, min_l22 = MIN_SCALE_PX / W, MIN_SCALE_PX / H
    prune_at = prune_steps(cfg.iterations) if cfg.prune_tau > 0 else set()
    phases = resolution_schedule(cfg.iterations, H, W, cfg.coarse)

    err = None  # [b] the last step's error, at the size it rendered
    for it in tqdm(range(cfg.iterations), disable=not progress, desc=f"fit {B}x{n}", unit="it"):
        h, w = next((h, w) for first, h, w in reversed(phases) if it >= first)
        if batch.stop_db is not None and (h, w) != (H, W) and it % COARSE_CHECK == 0:
            batch = coarse_check(batch, err, cfg, done, done_mask)
        if batch is None:
            break
        out = render(batch.params, h, w, batch.mask, cfg.backend, cfg.compile)
        err = mse(out, batch.target(h, w))  # [b]
        reached = torch.zeros_like(err, dtype=torch.bool)
        if batch.stop_db is not None and (h, w) == (H, W):  # the target is a full-size PSNR
            reached = psnr_from_mse(err.detach()) >= batch.stop_db
            if reached.all():
                batch = stop(batch, reached, done, done_mask)
                break
            if reached.any():  # they keep the parameters just rendered; the others step on
                record(batch, reached, done, done_mask)
        steps_run[batch.index[~reached].cpu()] += 1
        l1 = (batch.leaves[2].abs() * batch.mask[..., None]).flatten(1).sum(1)  # [b]
        loss = (err + cfg.color_l1 * l1)[~reached].sum()
        batch.opt.zero_grad(set_to_none=True)
        loss.backward()
        batch.opt.step()
        _, chol, rgb = batch.leaves
        with torch.no_grad():
            chol[..., 0].clamp_(min=min_l11)
            chol[..., 2].clamp_(min=min_l22)
            if it + 1 in prune_at:
                batch.mask = prune_mask(batch.params, batch.mask, cfg.prune_tau)
            rgb.mul_(batch.mask[..., None])
        if reached.any():
            batch.keep(~reached)
    if batch is not None:
        record(batch, torch.ones_like(batch.index, dtype=torch.bool), done, done_mask)

    with torch.no_grad():
        params = done.half().float()  # what gets stored
        mask = prune_mask(params, done_mask, cfg.prune_tau)
        params[..., 5:8] *= mask[..., None]
        final = render(params, H, W, mask, cfg.backend)
        quality = psnr(final, images).tolist()
        structure = ssim(final, images).tolist()
    seconds = (time.perf_counter() - start) / B
    splats = Splats(params, mask, H, W)
    metrics = []
    for i, live in enumerate(splats.live_counts()):
        nbytes = BYTES_PER_GAUSSIAN * live
        m = {
            "psnr": quality[i],
            "ssim": structure[i],
            "gaussians": live,
            "pruned": n - live,
            "bytes": nbytes,
            "raw_bytes": H * W * 3,
            "ratio_raw": H * W * 3 / max(nbytes, 1),
            "iterations": int(steps_run[i]),
            "seconds": seconds,
            "height": H,
            "width": W,
        }
        if source_bytes is not None:
            m["source_bytes"] = source_bytes[i]
            m["ratio_source"] = source_bytes[i] / max(nbytes, 1)
        metrics.append(m)
    return FitResult(splats, metrics)
