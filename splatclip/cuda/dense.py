"""Dense reference renderer: every Gaussian against every pixel. The oracle the fast paths are
tested against; memory is bounded by rendering the Gaussians in chunks (recomputed in backward)."""

import torch
from torch.utils.checkpoint import checkpoint

from splatclip.cuda.contract import gaussian_weight, pixel_centers


def _chunk_sum(p, live, ys, xs):
    # p [B, n, 8], live [B, n], ys [HW], xs [HW] -> [B, HW, 3]
    dx = xs[None, None, :] - p[..., 0:1]  # [B, n, HW]
    dy = ys[None, None, :] - p[..., 1:2]
    w = gaussian_weight(dx, dy, p[..., 2:3], p[..., 3:4], p[..., 4:5])
    w = torch.where(live[..., None], w, torch.zeros_like(w))
    return torch.einsum("bnp,bnc->bpc", w, p[..., 5:8])


def render_dense(params, height: int, width: int, mask=None, chunk: int = 64):
    """params [B, N, 8], mask [B, N] bool or None -> image [B, 3, H, W]."""
    B, N, _ = params.shape
    ys, xs = pixel_centers(height, width, params.dtype, params.device)
    ys = ys[:, None].expand(height, width).reshape(-1)  # [HW]
    xs = xs[None, :].expand(height, width).reshape(-1)
    live = torch.ones(B, N, dtype=torch.bool, device=params.device) if mask is None else mask.bool()
    out = params.new_zeros(B, height * width, 3)
    for s in range(0, N, chunk):
        p, m = params[:, s : s + chunk], live[:, s : s + chunk]
        if torch.is_grad_enabled() and params.requires_grad:
            out = out + checkpoint(_chunk_sum, p, m, ys, xs, use_reentrant=False)
        else:
            out = out + _chunk_sum(p, m, ys, xs)
    return out.transpose(1, 2).reshape(B, 3, height, width)
