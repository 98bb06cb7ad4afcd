"""Per (Gaussian, tile) pair math: which candidate pairs binning keeps, and for the tiled CPU renderer
each pair's colors at the tile's pixels and, written out by hand, their gradient. Pure functions of
tensors only (the tile grid is a tensor too), so the same code runs eagerly and exports to a compiled
kernel (`splatclip.cuda.aot`).

geom: int64 [4] (tiles_x, tiles, height, width): tiles across, tiles per image, image size in pixels.
"""

import torch

from splatclip.cuda.contract import CUTOFF

TILE = 8  # pixels a side (why 8, not the GPU kernels' 16: splatclip.cuda.tiled)


def ellipse_reaches(p, x0, x1, y0, y1):
    """Whether q = 0.5 |L^-1 (point - mu)|^2 <= CUTOFF somewhere on the rectangle [x0, x1] x [y0, y1]
    (normalized coordinates), for pairs: p [P, 5] (x, y, l11, l21, l22), bounds [P]. The minimum of
    the convex q is 0 at the center when it lies inside, else on an edge, where it is a quadratic in
    the position along the edge."""
    x, y, l11, l21, l22 = p.unbind(-1)

    def z(px, py):  # L^-1 (point - mu), as the renderers compute it
        z1 = (px - x) / l11
        return z1, (py - y - l21 * z1) / l22

    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    least = torch.full_like(x, float("inf"))
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x0, y1), (x1, y1)), ((x0, y0), (x0, y1)), ((x1, y0), (x1, y1))):
        a1, a2 = z(ax, ay)
        b1, b2 = z(bx, by)
        e1, e2 = b1 - a1, b2 - a2  # z is affine: z(a + t (b - a)) = z(a) + t (z(b) - z(a))
        t = (-(a1 * e1 + a2 * e2) / (e1 * e1 + e2 * e2).clamp_min(1e-30)).clamp(0, 1)
        least = torch.minimum(least, 0.5 * ((a1 + t * e1) ** 2 + (a2 + t * e2) ** 2))
    return inside | (least <= CUTOFF * (1 + 1e-4))


def pair_keys(p, gaussian, start, tx0, ty0, span, grid):
    """Binning's candidate pairs, one per tile of each Gaussian's box, tested against the ellipse.

    p [M, 8] the batch's Gaussians (M = B N), gaussian [P0] each candidate's Gaussian (ascending, its
    candidates consecutive), start [M] its first candidate, tx0 ty0 span [M] the box's first tile and
    width in tiles; grid int64 [6] (tile, width, height, tiles_x, tiles, N) -> keep [P0] bool (the
    3-sigma ellipse reaches the tile's pixel centers), key [P0] image * tiles + tile.
    """
    tile, width, height, tiles_x, tiles, n = grid.unbind()
    k = torch.arange(gaussian.shape[0], device=gaussian.device) - start[gaussian]  # [P0] index in the box
    along = span[gaussian]
    tx, ty = tx0[gaussian] + k % along, ty0[gaussian] + k // along
    # the rectangle of the tile's pixel centers, normalized (the last tile may be cut by the image)
    x0, y0 = (tx * tile + 0.5) / width, (ty * tile + 0.5) / height
    x1 = (torch.minimum(tx * tile + tile, width) - 0.5) / width
    y1 = (torch.minimum(ty * tile + tile, height) - 0.5) / height
    keep = ellipse_reaches(p[gaussian, :5], x0, x1, y0, y1)
    return keep, (gaussian // n) * tiles + ty * tiles_x + tx


def geometry(cols, key, geom):
    """Per (Gaussian, tile) pair: z1, z2, weights w, all [P, TILE^2]. cols [8, P]: the pairs' parameters,
    one row per parameter, so that a vectorized loop over pairs reads each one contiguously; key [P]:
    image * tiles + tile."""
    tiles_x, tiles, height, width = geom.unbind()
    x, y, l11, l21, l22 = (c[:, None] for c in cols[:5])
    tile = key % tiles
    ty, tx = tile // tiles_x, tile % tiles_x
    local = torch.arange(TILE, device=cols.device, dtype=cols.dtype)
    px = (tx[:, None] * TILE + local.repeat(TILE)[None, :] + 0.5) / width  # [P, TILE^2]
    py = (ty[:, None] * TILE + local.repeat_interleave(TILE)[None, :] + 0.5) / height
    z1 = (px - x) / l11
    z2 = (py - y - l21 * z1) / l22
    q = 0.5 * (z1 * z1 + z2 * z2)
    w = torch.where(q <= CUTOFF, torch.exp(-q), torch.zeros_like(q))
    return z1, z2, w


def pair_grads(cols, z1, z2, w, g):
    """Gradient of sum(g * w c) w.r.t. the 8 parameters of each pair.

    cols [8, P], z1 z2 w [P, TILE^2], g [P, 3, TILE^2] (upstream gradient at the pair's pixels, one
    plane per channel) -> [P, 8]. With z1 = dx / l11, z2 = (dy - l21 z1) / l22 and
    w = exp(-(z1^2 + z2^2) / 2) inside the cut-off.
    """
    l11, l21, l22, r, gr, b = (c[:, None] for c in cols[2:])
    g_r, g_g, g_b = g[:, 0], g[:, 1], g[:, 2]  # [P, TILE^2] each
    gq = -w * (g_r * r + g_g * gr + g_b * b)  # dq: w is already 0 outside the cut-off
    gz2 = gq * z2
    gz1 = gq * z1 - gz2 * (l21 / l22)  # through z1's use inside z2
    return torch.stack([-gz1.sum(1) / l11[:, 0], -gz2.sum(1) / l22[:, 0], -(gz1 * z1).sum(1) / l11[:, 0],
                        -(gz2 * z1).sum(1) / l22[:, 0], -(gz2 * z2).sum(1) / l22[:, 0],
                        (w * g_r).sum(1), (w * g_g).sum(1), (w * g_b).sum(1)], 1)


def pair_colors(cols, key, geom):
    """cols [8, P], key [P] -> each pair's colors at its tile's pixels [P, 3 TILE^2], channel-major."""
    _, _, w = geometry(cols, key, geom)
    return (w[:, None, :] * cols[5:8].t()[:, :, None]).reshape(w.shape[0], 3 * TILE * TILE)


def pair_backward(cols, key, grad_tiles, geom):
    """grad_tiles [B * tiles, 3, TILE^2]: the upstream gradient cut into tiles, one plane per channel
    -> the gradient of each pair's 8 parameters [P, 8]."""
    z1, z2, w = geometry(cols, key, geom)
    return pair_grads(cols, z1, z2, w, grad_tiles[key])


def tile_colors(zeros, cols, key, geom):
    """The pairs' colors added into their tiles: zeros [B * tiles, 3 TILE^2] -> the tiles' colors."""
    return zeros.index_add(0, key, pair_colors(cols, key, geom))

