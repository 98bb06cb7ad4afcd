"""The batched fitter: one Adam optimizer over a whole batch of images, B images of one size, each
with its own N Gaussians. The loss is a sum of per-image losses, so every image follows exactly the
path it would follow alone (Adam is elementwise); an image that reaches the target PSNR is frozen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from splatclip.cuda import render
from splatclip.fitting.init import random_init, structured_init
from splatclip.fitting.metrics import mse, psnr, psnr_from_mse, ssim
from splatclip.fitting.prune import prune_mask
from splatclip.platform.specs import FitParams
from splatclip.splats import BYTES_PER_GAUSSIAN, Splats

log = logging.getLogger(__name__)

MIN_SCALE_PX = 0.1  # l11 and l22 never shrink below a tenth of a pixel


@dataclass
class FitResult:
    splats: Splats  # float16-rounded parameters, the ones that get stored
    metrics: list[dict]  # one dict per image


def prune_steps(iterations: int) -> set[int]:
    """Pruning happens at half and three quarters of the run, then once more after the last step."""
    return {iterations // 2, (3 * iterations) // 4} - {0}


def fit_batch(images, cfg: FitParams, source_bytes: list[int] | None = None, progress: bool = False) -> FitResult:
    """images [B, 3, H, W] in [0, 1] -> fitted splats and per-image metrics."""
    start = time.perf_counter()
    B, _, H, W = images.shape
    n = cfg.gaussians
    torch.manual_seed(cfg.seed)
    if cfg.init == "structured":
        init = structured_init(images, n, cfg.backend)
    else:
        init = random_init(images, n, cfg.seed)
    cell = 1.0 / (n**0.5)  # a grid cell, in normalized units
    xy = init[..., 0:2].clone().requires_grad_()
    chol = init[..., 2:5].clone().requires_grad_()
    rgb = init[..., 5:8].clone().requires_grad_()
    opt = torch.optim.Adam(
        [
            {"params": [xy], "lr": cfg.lr_position * cell},
            {"params": [chol], "lr": cfg.lr_cholesky * cell},
            {"params": [rgb], "lr": cfg.lr_color},
        ]
    )
    min_l11, min_l22 = MIN_SCALE_PX / W, MIN_SCALE_PX / H
    mask = torch.ones(B, n, dtype=torch.bool, device=images.device)
    stopped = torch.zeros(B, dtype=torch.bool, device=images.device)
    frozen = [t.detach().clone() for t in (xy, chol, rgb)]
    steps_run = torch.zeros(B, dtype=torch.long)
    prune_at = prune_steps(cfg.iterations) if cfg.prune_tau > 0 else set()

    for it in tqdm(range(cfg.iterations), disable=not progress, desc=f"fit {B}x{n}", unit="it"):
        params = torch.cat([xy, chol, rgb], -1)
        out = render(params, H, W, mask, cfg.backend, cfg.compile)
        err = mse(out, images)  # [B]
        l1 = (rgb.abs() * mask[..., None]).flatten(1).sum(1)  # [B]
        loss = torch.where(stopped, torch.zeros_like(err), err + cfg.color_l1 * l1).sum()
        if cfg.target_psnr is not None:
            reached = ~stopped & (psnr_from_mse(err.detach()) >= cfg.target_psnr)
            if reached.any():
                for f, t in zip(frozen, (xy, chol, rgb)):
                    f[reached] = t.detach()[reached]
                stopped = stopped | reached
                if stopped.all():
                    break
        steps_run += (~stopped).long().cpu()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            chol[..., 0].clamp_(min=min_l11)
            chol[..., 2].clamp_(min=min_l22)
            if it + 1 in prune_at:
                mask = prune_mask(torch.cat([xy, chol, rgb], -1), mask, cfg.prune_tau)
            rgb.mul_(mask[..., None])
            if stopped.any():
                for f, t in zip(frozen, (xy, chol, rgb)):
                    t[stopped] = f[stopped]

    with torch.no_grad():
        params = torch.cat([xy, chol, rgb], -1).detach().half().float()  # what gets stored
        mask = prune_mask(params, mask, cfg.prune_tau)
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
