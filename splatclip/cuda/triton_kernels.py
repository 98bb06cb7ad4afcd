"""Triton kernels of the tiled accumulated-sum rasterizer, one program per (image, tile).

The forward loops over ALL Gaussians binned to its tile, CHUNK at a time (there is no cap on how
many a tile may hold), and accumulates the TILE x TILE pixels of the tile. The backward recomputes
the weights chunk by chunk, reduces each Gaussian's gradient over the tile's pixels and adds it into
the per-Gaussian gradients atomically. The math is `pairs.pair_grads`, term for term.

Each kernel's launch (`KERNELS`) is sized to the register file: a program holds a [CHUNK, TILE^2]
block of every intermediate spread over its warps' threads, so CHUNK x TILE^2 / (32 x warps) values
per intermediate per thread. At CHUNK 8 over 8 warps that is 8, and both kernels compile within 128
registers per thread with no spills on sm_80 and sm_90 (`splatclip.cuda.kernel_resources` checks it
ahead of time, without a GPU). CHUNK 32 over 4 warps, the first version, took 222-255 registers and
the backward spilled 824-888 bytes per thread.

On a CPU machine these run in Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

from typing import NamedTuple

import triton
import triton.language as tl

from splatclip.cuda.contract import CUTOFF, TILE


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
def _weights(px, py, x, y, l11, l21, l22, live, CUTOFF: tl.constexpr):
    # px, py [TILE^2]; Gaussian fields [CHUNK] -> z1, z2, w [CHUNK, TILE^2]
    z1 = (px[None, :] - x[:, None]) / l11[:, None]
    z2 = (py[None, :] - y[:, None] - l21[:, None] * z1) / l22[:, None]
    q = 0.5 * (z1 * z1 + z2 * z2)
    w = tl.where((q <= CUTOFF) & live[:, None], tl.exp(-q), 0.0)
    return z1, z2, w


@triton.jit
def _pixel_centers(pid, tiles, tiles_x, height, width, TILE: tl.constexpr):
    tile = pid % tiles
    ty = tile // tiles_x
    tx = tile % tiles_x
    pix = tl.arange(0, TILE * TILE)
    px = ((tx * TILE + pix % TILE).to(tl.float32) + 0.5) / width
    py = ((ty * TILE + pix // TILE).to(tl.float32) + 0.5) / height
    return pix, px, py


@triton.jit
def render_fwd_kernel(params, gaussian, offsets, out, tiles, tiles_x, height, width,
                      CHUNK: tl.constexpr, TILE: tl.constexpr, CUTOFF: tl.constexpr):
    pid = tl.program_id(0)  # image * tiles + tile
    pix, px, py = _pixel_centers(pid, tiles, tiles_x, height, width, TILE)
    start = tl.load(offsets + pid)
    end = tl.load(offsets + pid + 1)
    acc_r = tl.zeros([TILE * TILE], dtype=tl.float32)
    acc_g = tl.zeros([TILE * TILE], dtype=tl.float32)
    acc_b = tl.zeros([TILE * TILE], dtype=tl.float32)
    for s in range(start, end, CHUNK):
        idx = s + tl.arange(0, CHUNK)
        live = idx < end
        g, x, y, l11, l21, l22, r, gr, b = _load_chunk(params, gaussian, idx, live)
        z1, z2, w = _weights(px, py, x, y, l11, l21, l22, live, CUTOFF)
        acc_r += tl.sum(w * r[:, None], axis=0)
        acc_g += tl.sum(w * gr[:, None], axis=0)
        acc_b += tl.sum(w * b[:, None], axis=0)
    base = out + pid.to(tl.int64) * (TILE * TILE * 3) + pix * 3
    tl.store(base + 0, acc_r)
    tl.store(base + 1, acc_g)
    tl.store(base + 2, acc_b)


@triton.jit
def render_bwd_kernel(params, gaussian, offsets, grad_out, grad_params, tiles, tiles_x, height, width,
                      CHUNK: tl.constexpr, TILE: tl.constexpr, CUTOFF: tl.constexpr):
    pid = tl.program_id(0)
    pix, px, py = _pixel_centers(pid, tiles, tiles_x, height, width, TILE)
    base = grad_out + pid.to(tl.int64) * (TILE * TILE * 3) + pix * 3
    go_r = tl.load(base + 0)
    go_g = tl.load(base + 1)
    go_b = tl.load(base + 2)
    start = tl.load(offsets + pid)
    end = tl.load(offsets + pid + 1)
    for s in range(start, end, CHUNK):
        idx = s + tl.arange(0, CHUNK)
        live = idx < end
        g, x, y, l11, l21, l22, r, gr, b = _load_chunk(params, gaussian, idx, live)
        z1, z2, w = _weights(px, py, x, y, l11, l21, l22, live, CUTOFF)
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


class Kernel(NamedTuple):
    """One kernel with the launch settings every caller uses: the op, and the ahead-of-time check."""

    fn: object
    signature: dict  # runtime argument -> Triton type, in order (for triton.compile)
    chunk: int  # Gaussians per inner step
    warps: int

    @property
    def constexprs(self) -> dict:
        return {"CHUNK": self.chunk, "TILE": TILE, "CUTOFF": CUTOFF}

    def launch(self, programs: int, *args):
        self.fn[(programs,)](*args, **self.constexprs, num_warps=self.warps)


_GEOMETRY = {"tiles": "i32", "tiles_x": "i32", "height": "i32", "width": "i32"}
KERNELS = {
    "render_fwd": Kernel(render_fwd_kernel, {"params": "*fp32", "gaussian": "*i32", "offsets": "*i32",
                                             "out": "*fp32", **_GEOMETRY}, chunk=8, warps=8),
    "render_bwd": Kernel(render_bwd_kernel, {"params": "*fp32", "gaussian": "*i32", "offsets": "*i32",
                                             "grad_out": "*fp32", "grad_params": "*fp32", **_GEOMETRY},
                         chunk=8, warps=8),
}
