"""Initial Gaussians for fitting: structured (a grid shaped like the image), ink (the same grid over
the part of a black frame that holds the ink) or random."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from splatclip.cuda import render
from splatclip.warps import warp_splats


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


INK = 0.1  # a pixel holds ink where a channel exceeds this (of 1)
# the ground is not black where more than this share of the border holds ink (the border's median is ink);
# a digit on black that the frame cuts, or one that fills it, holds far less
BORDER = 0.5


def ink_box(image: torch.Tensor, rows: int, cols: int) -> tuple[int, int, int, int]:
    """image [3, H, W] -> (top, left, height, width) in pixels: the smallest box of the frame's aspect
    ratio, one pixel wider than the ink on each side (as far as the frame goes), that holds the image's
    ink, or the whole frame where there is no ink, the ink holds most of the border (no black ground), or
    the box would give grid cells under a pixel (`rows` x `cols`). A digit the frame cuts keeps a box on
    its ink."""
    _, H, W = image.shape
    ink = image.amax(0) > INK  # [H, W]
    border = torch.cat([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    if not bool(ink.any()) or border.float().mean() > BORDER:
        return 0, 0, H, W
    ys, xs = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    top, bottom, left, right = int(ys.min()) - 1, int(ys.max()) + 2, int(xs.min()) - 1, int(xs.max()) + 2
    scale = max((bottom - top) / H, (right - left) / W, rows / H, cols / W)  # of the frame, at its aspect
    h, w = min(H, math.ceil(scale * H)), min(W, math.ceil(scale * W))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    t, lft = min(max(0, round(cy - h / 2)), H - h), min(max(0, round(cx - w / 2)), W - w)
    return t, lft, h, w


def ink_init(images, n: int, backend: str = "auto"):
    """images [B, 3, H, W] -> params [B, n, 8]: `structured_init` of each image's `ink_box`, placed
    back in the frame, so that a digit drawn smaller or elsewhere on black gets the same grid on its
    ink (nothing is spent on the empty ground around it)."""
    B, _, H, W = images.shape
    rows, cols = grid_shape(n, H, W)
    boxes = [ink_box(image, rows, cols) for image in images]
    params = images.new_zeros(B, n, 8)
    for h, w in sorted({(h, w) for _, _, h, w in boxes}):
        idx = [i for i, box in enumerate(boxes) if box[2:] == (h, w)]
        crops = torch.stack([images[i, :, boxes[i][0] : boxes[i][0] + h, boxes[i][1] : boxes[i][1] + w] for i in idx])
        p = structured_init(crops, n, backend)  # [b, n, 8] in the box's normalized coordinates
        # the box's coordinates to the frame's: scaled by the box's share of the frame about the
        # center, then moved so that the box's corner lands on (left, top)
        A = torch.diag(images.new_tensor([w / W, h / H])).expand(len(idx), 2, 2)
        corner = images.new_tensor([[boxes[i][1] / W, boxes[i][0] / H] for i in idx])  # [b, 2] (x, y)
        params[idx] = warp_splats(p, A, corner + 0.5 * images.new_tensor([w / W, h / H]) - 0.5)
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
