"""gsplat's alpha-blended CUDA rasterizer as a backend: the "prior implementation" baseline.

How the 8 parameters map onto gsplat's 2D rasterization inputs (`rasterize_to_pixels`):
- means2d = (x * W, y * H): gsplat's pixel (i, j) has its center at (j + 0.5, i + 0.5), ours at
  ((j + 0.5) / W, (i + 0.5) / H), so scaling by the image size maps one onto the other;
- the covariance in pixels is S = D L L^T D with D = diag(W, H); gsplat takes its inverse, the
  conic (S^-1[0, 0], S^-1[0, 1], S^-1[1, 1]), and per-axis radii ceil(3 sqrt(S[0, 0])), ceil(3 sqrt(S[1, 1]));
- colors = (r, g, b); opacity 1; depth = the Gaussian's index (gsplat blends front to back).
The image model differs: gsplat composites alpha_i = min(0.999, exp(-q_i)) front to back with
transmittance instead of summing colors, so the same splats render differently; a model fitted
with this backend is a gsplat-compatible one. CUDA only (gsplat JIT-compiles its kernels).
"""

import torch


def gsplat_inputs(params, height: int, width: int, mask=None):
    """params [B, N, 8] -> means2d [B, N, 2], conics [B, N, 3], colors [B, N, 3], opacities [B, N],
    radii [B, N, 2] int32, depths [B, N]."""
    B, N, _ = params.shape
    x, y, l11, l21, l22 = (params[..., i] for i in range(5))
    a = (l11 * width) ** 2
    b = (l11 * width) * (l21 * height)
    c = (l21 * height) ** 2 + (l22 * height) ** 2
    det = (a * c - b * b).clamp_min(1e-12)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    radii = torch.stack([torch.ceil(3 * a.sqrt()), torch.ceil(3 * c.sqrt())], -1).to(torch.int32)
    if mask is not None:
        radii = radii * mask[..., None].to(torch.int32)  # radius 0: never binned
    means2d = torch.stack([x * width, y * height], -1)
    depths = torch.arange(N, device=params.device, dtype=params.dtype).expand(B, N).contiguous()
    opacities = torch.ones(B, N, device=params.device, dtype=params.dtype)
    return means2d, conics, params[..., 5:8], opacities, radii, depths


def render_gsplat(params, height: int, width: int, mask=None):
    """params [B, N, 8] -> [B, 3, H, W] through gsplat's tile rasterizer (alpha blending)."""
    if params.device.type != "cuda":
        raise RuntimeError("the gsplat backend needs a CUDA device")
    from gsplat import isect_offset_encode, isect_tiles, rasterize_to_pixels

    tile = 16
    tiles_w, tiles_h = -(-width // tile), -(-height // tile)
    means2d, conics, colors, opacities, radii, depths = gsplat_inputs(params.float(), height, width, mask)
    _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile, tiles_w, tiles_h)
    offsets = isect_offset_encode(isect_ids, params.shape[0], tiles_w, tiles_h)
    image, _ = rasterize_to_pixels(means2d, conics, colors.contiguous(), opacities, width, height, tile,
                                   offsets, flatten_ids)
    return image.permute(0, 3, 1, 2).to(params.dtype)  # [B, H, W, 3] -> [B, 3, H, W]
