"""Image quality metrics, per image of a batch. Images are [B, 3, H, W] in [0, 1]."""

import torch
import torch.nn.functional as F


def mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)  # [B]


def psnr_from_mse(m):
    return 10.0 * torch.log10(1.0 / m.clamp_min(1e-12))


def psnr(a, b):
    """[B] PSNR in dB of a against b, with a clipped to [0, 1] as a display would."""
    return psnr_from_mse(mse(a.clamp(0, 1), b))


def ssim(a, b, window: int = 11, sigma: float = 1.5):
    """[B] mean SSIM (Wang et al. 2004; Gaussian window, per channel, valid region)."""
    a = a.clamp(0, 1)
    coords = torch.arange(window, dtype=a.dtype, device=a.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window)
    blur = lambda x: F.conv2d(x, kernel, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
