"""Bin the Gaussians of a batch to the square tiles (16x16 by default) their 3-sigma boxes touch.

Sort-based and made of tensor ops only, so the same code bins on GPU and CPU. Each (Gaussian, tile)
pair gets the key image * tiles + tile; sorted by key, the pairs of one tile are contiguous and
`offsets[key] : offsets[key + 1]` lists them. The boxes are conservative by a thousandth of a pixel;
then a pair is kept only where the Gaussian's 3-sigma ellipse reaches the rectangle of the tile's
pixel centers (`pairs.ellipse_reaches`: an elongated or tilted Gaussian's box holds many tiles its ellipse
misses, and every pair kept costs a tile's worth of work). The exact cut-off is applied per pixel by
the renderers.
"""

from typing import NamedTuple

import torch

from splatclip.cuda import aot
from splatclip.cuda.contract import SIGMAS, TILE
from splatclip.cuda.pairs import pair_keys

_SLACK = 1e-3  # pixels


class Bins(NamedTuple):
    key: torch.Tensor  # [P] image * tiles + tile, ascending when sorted
    gaussian: torch.Tensor  # [P] flat index image * N + n into params.reshape(B * N, 8)
    offsets: torch.Tensor  # [B * tiles + 1] start of each (image, tile) in key order
    tiles_x: int
    tiles_y: int


def tile_grid(height: int, width: int, tile: int = TILE) -> tuple[int, int]:
    """(tiles_y, tiles_x) covering the image."""
    return -(-height // tile), -(-width // tile)


def tile_boxes(params, height: int, width: int, mask=None, tile: int = TILE):
    """Inclusive tile ranges (tx0, tx1, ty0, ty1) [B, N] and pair counts [B, N] (0: no tile)."""
    p = params.detach()
    x, y, l11, l21, l22 = p[..., 0], p[..., 1], p[..., 2], p[..., 3], p[..., 4]
    rx = SIGMAS * l11.abs() * width  # pixels
    ry = SIGMAS * torch.sqrt(l21 * l21 + l22 * l22) * height
    cx, cy = x * width - 0.5, y * height - 0.5  # pixel-index coordinates
    big = float(max(height, width) + 2)
    j0 = torch.ceil((cx - rx - _SLACK).clamp(-big, big))
    j1 = torch.floor((cx + rx + _SLACK).clamp(-big, big))
    i0 = torch.ceil((cy - ry - _SLACK).clamp(-big, big))
    i1 = torch.floor((cy + ry + _SLACK).clamp(-big, big))
    valid = (j1 >= 0) & (j0 <= width - 1) & (i1 >= 0) & (i0 <= height - 1) & torch.isfinite(p).all(-1)
    if mask is not None:
        valid &= mask.bool()
    tx0 = (j0.clamp(0, width - 1) // tile).long()
    tx1 = (j1.clamp(0, width - 1) // tile).long()
    ty0 = (i0.clamp(0, height - 1) // tile).long()
    ty1 = (i1.clamp(0, height - 1) // tile).long()
    count = (tx1 - tx0 + 1) * (ty1 - ty0 + 1) * valid.long()
    return tx0, tx1, ty0, ty1, count


def bin_gaussians(params, height: int, width: int, mask=None, sort: bool = True, tile: int = TILE,
                  compiled: bool = False) -> Bins:
    """params [B, N, 8] -> every (Gaussian, tile) pair whose 3-sigma ellipse reaches a tile x tile tile;
    `compiled`: the pairs' test in this machine's compiled kernel (`aot`) where it applies."""
    B, N, _ = params.shape
    tiles_y, tiles_x = tile_grid(height, width, tile)
    tiles = tiles_x * tiles_y
    with torch.no_grad():
        tx0, tx1, ty0, ty1, count = (t.reshape(-1) for t in tile_boxes(params, height, width, mask, tile))
        flat = torch.arange(B * N, device=params.device)
        gaussian = torch.repeat_interleave(flat, count)  # [P0]: a candidate pair per tile of each box
        start = torch.cumsum(count, 0) - count  # [B N]
        grid = torch.tensor([tile, width, height, tiles_x, tiles, N])  # see pairs.pair_keys
        p = params.detach().reshape(B * N, 8).contiguous()  # the compiled kernel reads rows of 8
        kernels = aot.load() if compiled and aot.applies(p.t(), len(gaussian)) else None
        keep, key = (kernels.pair_keys if kernels else pair_keys)(p, gaussian, start, tx0, ty0, tx1 - tx0 + 1, grid)
        gaussian, key = gaussian[keep], key[keep]
        if sort:
            key, order = torch.sort(key, stable=True)
            gaussian = gaussian[order]
        per_tile = torch.bincount(key, minlength=B * tiles)
        offsets = torch.zeros(B * tiles + 1, dtype=torch.long, device=params.device)
        offsets[1:] = torch.cumsum(per_tile, 0)
    return Bins(key, gaussian, offsets, tiles_x, tiles_y)
