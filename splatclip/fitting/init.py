"""Initial Gaussians for fitting: structured (a grid shaped like the image) or random."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from splatclip.cuda import render


def grid_shape(n: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the largest grid with about the image's aspect ratio and rows * cols <= n."""
    rows = min(n, max(1, math.floor(math.sqrt(n * height / width) + 1e-9)))
    return rows, n // rows


def _grid(rows: int, cols: int, height: int, width: int, dtype, device):
    """[rows * cols, 8]: Gaussians at the cell centers, 1-sigma circle inscribed in the cell (in
    pixels), unit color."""
    ys = (torch.arange(rows, dtype=dtype, device=device) + 0.5) / rows
    xs = (torch.arange(cols, dtype=dtype, device=device) + 0.5) / cols
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    radius = 0.5 * min(height / rows, width / cols)  # pixels
    p = torch.zeros(rows * cols, 8, dtype=dtype, device=device)
    p[:, 0], p[:, 1] = x.reshape(-1), y.reshape(-1)
    p[:, 2], p[:, 4] = radius / width, radius / height
    p[:, 5:8] = 1.0
    return p


def structured_init(images, n: int, backend: str = "auto"):
    """images [B, 3, H, W] -> params [B, n, 8].

    One Gaussian per cell of a rows x cols grid (`grid_shape`). Colors are the cell means of the
    image divided by the grid's own coverage (the sum of the unit Gaussians at each pixel, about
    1.6 inside and less at the borders), so the initial render reproduces the cell means. The
    n - rows * cols Gaussians that do not fill another row go to the cells with the highest color
    variance, at the cell center with half the radius and zero color: they change nothing at first
    and give the optimizer spare Gaussians where the detail is.
    """
    B, _, H, W = images.shape
    rows, cols = grid_shape(n, H, W)
    grid = _grid(rows, cols, H, W, images.dtype, images.device)  # [C, 8]
    with torch.no_grad():
        coverage = render(grid[None], H, W, backend=backend)[:, :1].clamp_min(1e-3)  # [1, 1, H, W]
        mean = F.adaptive_avg_pool2d(images / coverage, (rows, cols))  # [B, 3, rows, cols]
        var = (F.adaptive_avg_pool2d(images**2, (rows, cols)) - F.adaptive_avg_pool2d(images, (rows, cols)) ** 2)
    params = grid[None].repeat(B, 1, 1)
    params[..., 5:8] = mean.flatten(2).transpose(1, 2)
    extra = n - rows * cols
    if extra:
        cells = var.sum(1).flatten(1).topk(extra, dim=1).indices  # [B, extra]
        spare = grid[cells].clone()  # [B, extra, 8]
        spare[..., 2:5] *= 0.5
        spare[..., 5:8] = 0.0
        params = torch.cat([params, spare], 1)
    return params


def random_init(images, n: int, seed: int = 0):
    """images [B, 3, H, W] -> params [B, n, 8]: uniform positions, the grid's radius, random colors.
    Every image draws from its own generator seeded with `seed`, so batching changes nothing."""
    B, _, H, W = images.shape
    rows, cols = grid_shape(n, H, W)
    radius = 0.5 * min(H / rows, W / cols)
    out = []
    for _ in range(B):
        g = torch.Generator().manual_seed(seed)
        p = torch.zeros(n, 8)
        p[:, 0:2] = torch.rand(n, 2, generator=g)
        p[:, 2], p[:, 4] = radius / W, radius / H
        p[:, 5:8] = torch.rand(n, 3, generator=g) / 1.6
        out.append(p)
    return torch.stack(out).to(images.device, images.dtype)
