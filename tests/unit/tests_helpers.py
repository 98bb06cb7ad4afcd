"""Shared test data."""

import torch


def random_splats(B, N, seed=0, dtype=torch.float64):
    """Positions spill past the borders (some wholly outside), sizes from sub-pixel to larger
    than the image, rotated covariances, signed colors."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, N, 8, generator=g, dtype=dtype)
    p[..., 0:2] = p[..., 0:2] * 1.6 - 0.3
    scale = torch.exp(torch.empty(B, N, 1, dtype=dtype).uniform_(-6, 0.5, generator=g))  # 0.0025 .. 1.6
    p[..., 2:3] = scale * (0.5 + p[..., 2:3])
    p[..., 4:5] = scale * (0.5 + p[..., 4:5])
    p[..., 3:4] = scale * (p[..., 3:4] - 0.5)
    p[..., 5:8] = p[..., 5:8] * 2 - 1
    return p
