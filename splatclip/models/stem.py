"""Per-Gaussian tokens: normalized parameters -> Fourier features -> linear projection."""

import math

import torch
from torch import nn

# Normalization of the 8 raw parameters before the Fourier features (all land roughly in [-1, 1]).
LOG_SCALE_CENTER, LOG_SCALE_SPREAD = -4.0, 3.0  # log l11, log l22 of 0.1 px .. half an image


def gaussian_features(params):
    """params [..., 8] (x, y, l11, l21, l22, r, g, b) -> [..., 8] normalized features:
    position in [-1, 1], log-Cholesky diagonal (scaled), off-diagonal relative to l22, color."""
    x, y, l11, l21, l22, rgb = params[..., 0], params[..., 1], params[..., 2], params[..., 3], params[..., 4], params[..., 5:8]
    log11 = (torch.log(l11.abs().clamp_min(1e-6)) - LOG_SCALE_CENTER) / LOG_SCALE_SPREAD
    log22 = (torch.log(l22.abs().clamp_min(1e-6)) - LOG_SCALE_CENTER) / LOG_SCALE_SPREAD
    shear = torch.tanh(l21 / l22.abs().clamp_min(1e-6))
    pos = torch.stack([x, y], -1) * 2 - 1
    return torch.cat([pos, torch.stack([log11, shear, log22], -1), rgb * 2 - 1], -1)


class SplatStem(nn.Module):
    """[B, N, 8] -> [B, N, width]."""

    def __init__(self, width: int, bands: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(bands), persistent=False)  # [K]
        self.proj = nn.Linear(8 * (2 * bands + 1), width)
        self.norm = nn.LayerNorm(width)

    def forward(self, params):
        f = gaussian_features(params)  # [B, N, 8]
        angles = f[..., None] * self.freqs  # [B, N, 8, K]
        fourier = torch.cat([f[..., None], angles.sin(), angles.cos()], -1).flatten(-2)  # [B, N, 8 (2K + 1)]
        return self.norm(self.proj(fourier))
