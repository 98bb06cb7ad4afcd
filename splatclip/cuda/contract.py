"""The rendering contract every backend meets (docs/design.md, 'The rendering contract').

Parameters per Gaussian, in order: x, y, l11, l21, l22, r, g, b. Positions are normalized to the
image (pixel (i, j) has its center at ((j + 0.5) / W, (i + 0.5) / H)); Sigma = L L^T with
L = [[l11, 0], [l21, l22]]. A Gaussian adds color * exp(-q) to a pixel where
q = 0.5 d^T Sigma^-1 d <= CUTOFF (inside 3 sigma), and nothing elsewhere.
"""

import torch

CUTOFF = 4.5  # q at 3 sigma: 0.5 * 3**2
SIGMAS = 3.0
TILE = 16  # pixels a side of the Triton kernels' tiles (and binning's default; the torch renderer uses 8)


def gaussian_weight(dx, dy, l11, l21, l22):
    """exp(-0.5 |L^-1 d|^2) inside the cut-off, 0 outside. All arguments broadcast."""
    z1 = dx / l11
    z2 = (dy - l21 * z1) / l22
    q = 0.5 * (z1 * z1 + z2 * z2)
    return torch.where(q <= CUTOFF, torch.exp(-q), torch.zeros_like(q))


def pixel_centers(height: int, width: int, dtype=torch.float32, device=None):
    """(ys [H], xs [W]) normalized pixel centers."""
    ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    return ys, xs
