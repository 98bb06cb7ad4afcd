"""Triton kernels of the tiled accumulated-sum rasterizer, one program per (image, tile).

The forward loops over ALL Gaussians binned to its tile, CHUNK at a time (there is no cap on how
many a tile may hold), and accumulates the 256 pixels of the tile. The backward recomputes the
weights chunk by chunk, reduces each Gaussian's gradient over the tile's pixels and adds it into
the per-Gaussian gradients atomically. The math is `tiled.pair_grads`, term for term.

On a CPU machine these run in Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

import triton
import triton.language as tl

CHUNK = 32  # Gaussians per inner step; a tile with more simply takes more steps
PIXELS = 256  # a 16x16 tile


@triton.jit
def _load_chunk(params, gaussian, idx, live):
    g = tl.load(gaussian + idx, mask=live, other=0).to(tl.int64) * 8
    x = tl.load(params + g + 0, mask=live, other=0.0)
    y = tl.load(params + g + 1, mask=live, other=0.0)
    l11 = tl.load(params + g + 2, mask=live, other=1.0)
    l21 = tl.load(params + g + 3, mask=live, other=0.0)
    l22 = tl.load(params + g + 4, mask=live, other=1.0)
    r = tl.load(params + g + 5, mask=live, other=0.0)
    gr = tl.load(params + g + 6, mask=live, other=0.0)
    b = tl.load(params + g + 7, mask=live, other=0.0)
    return g, x, y, l11, l21, l22, r, gr, b


@triton.jit
def _weights(px, py, x, y, l11, l21, l22, live):
    # px, py [PIXELS]; Gaussian fields [CHUNK] -> z1, z2, w [CHUNK, PIXELS]
    z1 = (px[None, :] - x[:, None]) / l11[:, None]
    z2 = (py[None, :] - y[:, None] - l21[:, None] * z1) / l22[:, None]
    q = 0.5 * (z1 * z1 + z2 * z2)
    w = tl.where((q <= 4.5) & live[:, None], tl.exp(-q), 0.0)
    return z1, z2, w


@triton.jit
def _pixel_centers(pid, tiles, tiles_x, height, width):
    tile = pid % tiles
    ty = tile // tiles_x
    tx = tile % tiles_x
    pix = tl.arange(0, 256)
    px = ((tx * 16 + pix % 16).to(tl.float32) + 0.5) / width
    py = ((ty * 16 + pix // 16).to(tl.float32) + 0.5) / height
    return pix, px, py


@triton.jit
def render_fwd_kernel(params, gaussian, offsets, out, tiles, tiles_x, height, width, CHUNK: tl.constexpr):
    pid = tl.program_id(0)  # image * tiles + tile
    pix, px, py = _pixel_centers(pid, tiles, tiles_x, height, width)
    start = tl.load(offsets + pid)
    end = tl.load(offsets + pid + 1)
    acc_r = tl.zeros([256], dtype=tl.float32)
    acc_g = tl.zeros([256], dtype=tl.float32)
    acc_b = tl.zeros([256], dtype=tl.float32)
    for s in range(start, end, CHUNK):
        idx = s + tl.arange(0, CHUNK)
        live = idx < end
        g, x, y, l11, l21, l22, r, gr, b = _load_chunk(params, gaussian, idx, live)
        z1, z2, w = _weights(px, py, x, y, l11, l21, l22, live)
        acc_r += tl.sum(w * r[:, None], axis=0)
        acc_g += tl.sum(w * gr[:, None], axis=0)
        acc_b += tl.sum(w * b[:, None], axis=0)
    base = out + pid.to(tl.int64) * 768 + pix * 3
    tl.store(base + 0, acc_r)
    tl.store(base + 1, acc_g)
    tl.store(base + 2, acc_b)


@triton.jit
def render_bwd_kernel(params, gaussian, offsets, grad_out, grad_params, tiles, tiles_x, height, width,
                      CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    pix, px, py = _pixel_centers(pid, tiles, tiles_x, height, width)
    base = grad_out + pid.to(tl.int64) * 768 + pix * 3
    go_r = tl.load(base + 0)
    go_g = tl.load(base + 1)
    go_b = tl.load(base + 2)
    start = tl.load(offsets + pid)
    end = tl.load(offsets + pid + 1)
    for s in range(start, end, CHUNK):
        idx = s + tl.arange(0, CHUNK)
        live = idx < end
        g, x, y, l11, l21, l22, r, gr, b = _load_chunk(params, gaussian, idx, live)
        z1, z2, w = _weights(px, py, x, y, l11, l21, l22, live)
        gw = go_r[None, :] * r[:, None] + go_g[None, :] * gr[:, None] + go_b[None, :] * b[:, None]
        gq = -w * gw
        gz2 = gq * z2
        gz1 = gq * z1 - gz2 * (l21 / l22)[:, None]
        dst = grad_params + g
        tl.atomic_add(dst + 0, -tl.sum(gz1, axis=1) / l11, mask=live)
        tl.atomic_add(dst + 1, -tl.sum(gz2, axis=1) / l22, mask=live)
        tl.atomic_add(dst + 2, -tl.sum(gz1 * z1, axis=1) / l11, mask=live)
        tl.atomic_add(dst + 3, -tl.sum(gz2 * z1, axis=1) / l22, mask=live)
        tl.atomic_add(dst + 4, -tl.sum(gz2 * z2, axis=1) / l22, mask=live)
        tl.atomic_add(dst + 5, tl.sum(w * go_r[None, :], axis=1), mask=live)
        tl.atomic_add(dst + 6, tl.sum(w * go_g[None, :], axis=1), mask=live)
        tl.atomic_add(dst + 7, tl.sum(w * go_b[None, :], axis=1), mask=live)
