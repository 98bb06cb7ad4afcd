"""Image transforms done exactly on splats, each beside its image-space twin.

A splat image is a sum of Gaussians, so some image transforms have an exact form on its parameters
(docs/method.md, 'Augmentation in splat space'); nothing is refitted:

- an affine map of the plane, p -> A (p - c) + c + t (c the image's center): each mean moves the same
  way and each covariance becomes A Sigma A^T (its Cholesky factor in closed form);
- a blur by an isotropic Gaussian of s pixels: Sigma + s^2 I, the color scaled by
  sqrt(det Sigma / det(Sigma + s^2 I)) (a Gaussian convolved with a normalized Gaussian);
- a gain per channel: the colors scaled (the renderer is linear in them);
- a smooth bend of the plane, p -> p + d(p) with d a sum of a few long sine waves (`bend_splats`,
  how one writer's digit differs from another's): each mean moves by d, each covariance becomes
  J Sigma J^T with J = I + dd/dp at its mean. Exact to first order: the bend is linearized across
  each Gaussian, which is small beside the waves' length (a side of the image or more);
- moving and scaling an image so its ink is centered with a given spread along its major axis, and
  undoing its slant (`canonical_splats`): the ink's centroid and second moments are sums over the
  Gaussians (each one's mass is its mean color times 2 pi |l11 l22|), so no render is needed to find
  the map;
- scaling its colors so that its ink's level (the intensity-weighted mean intensity, the integral of
  I^2 over the integral of I) is a given one (`level_gain`): the integral of a product of two Gaussians
  is closed-form, so the level of a splat set is a sum over its pairs.

The twins (`warp_images`, `blur_images`, colors times the gain) do the same to a rendered or source
image by resampling, so a model and a teacher can be shown one transformed image. Rendering the
transformed splats equals transforming the render up to the resampling error and the renderer's
cut-off at 3 sigma (tests/unit/test_warps.py). Positions are normalized ([0, 1] across the width and
the height), so a rotation in pixels is `affine_normalized`'s conjugation of it by the image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from splatclip.cuda.contract import pixel_centers


def affine_normalized(A_pix: torch.Tensor, t_pix: torch.Tensor, height: int, width: int):
    """A map in pixels (A_pix [b, 2, 2] about the image center, t_pix [b, 2] in pixels, x then y)
    -> the same map in normalized coordinates: (A [b, 2, 2], t [b, 2])."""
    size = A_pix.new_tensor([width, height])  # [2]
    A = A_pix * size[None, None, :] / size[None, :, None]  # D^-1 A_pix D, D = diag(W, H)
    return A, t_pix / size


def warp_splats(params: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """params [b, N, 8] -> the splats of the image warped by p -> A (p - 0.5) + 0.5 + t (normalized)."""
    mean = params[..., 0:2] - 0.5  # [b, N, 2]
    moved = torch.einsum("bij,bnj->bni", A, mean) + 0.5 + t[:, None, :]
    return torch.cat([moved, transform_factor(params, A[:, None]), params[..., 5:8]], -1)


def transform_factor(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """params [b, N, 8], a [b, N or 1, 2, 2] -> the Cholesky factor (l11, l21, l22) [b, N, 3] of each
    covariance mapped by its a: a Sigma a^T."""
    l11, l21, l22 = params[..., 2], params[..., 3], params[..., 4]  # [b, N] each
    # M = a L, L = [[l11, 0], [l21, l22]]; the new factor is the Cholesky factor of M M^T
    m11, m12 = a[..., 0, 0] * l11 + a[..., 0, 1] * l21, a[..., 0, 1] * l22
    m21, m22 = a[..., 1, 0] * l11 + a[..., 1, 1] * l21, a[..., 1, 1] * l22
    n11 = torch.sqrt(m11 * m11 + m12 * m12)
    n21 = (m21 * m11 + m22 * m12) / n11
    n22 = torch.abs(m11 * m22 - m12 * m21) / n11
    return torch.stack([n11, n21, n22], -1)


def warp_images(images: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """images [b, C, H, W] -> warped by the same map as `warp_splats` (bilinear; black outside)."""
    inv = torch.linalg.inv(A)  # [b, 2, 2]
    # grid_sample's coordinates are u = 2p - 1 (align_corners=False): output u' reads input A^-1 (u' - 2t)
    theta = torch.cat([inv, -2 * torch.einsum("bij,bj->bi", inv, t)[..., None]], -1)  # [b, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def bend_phase(p: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Each wave's phase 2 pi freq_k . p + phase_k [b, M, K] at points p [b, M, 2] (normalized), with
    freq [b, K, 2] (cycles per side) and phase [b, K]."""
    return 2 * math.pi * torch.einsum("bmj,bkj->bmk", p, freq) + phase[:, None, :]


def bend(p: torch.Tensor, amp: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The bend d(p) = sum_k amp_k sin(2 pi freq_k . p + phase_k) [b, M, 2] at points p [b, M, 2], with
    amp [b, K, 2] (`bend_phase` for the rest)."""
    return torch.einsum("bmk,bki->bmi", torch.sin(bend_phase(p, freq, phase)), amp)


def bend_jacobian(p: torch.Tensor, amp: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The bend's Jacobian dd/dp [b, M, 2, 2] at points p [b, M, 2] (arguments as `bend`'s)."""
    return torch.einsum("bmk,bki,bkj->bmij", torch.cos(bend_phase(p, freq, phase)), amp, 2 * math.pi * freq)


def bend_splats(params: torch.Tensor, amp: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """params [b, N, 8] -> the splats of the image bent by p -> p + d(p) (`bend`), each Gaussian
    mapped by the bend's linearization at its mean."""
    mean = params[..., 0:2]  # [b, N, 2]
    a = bend_jacobian(mean, amp, freq, phase) + torch.eye(2, dtype=params.dtype, device=params.device)  # [b, N, 2, 2]
    return torch.cat([mean + bend(mean, amp, freq, phase), transform_factor(params, a), params[..., 5:8]], -1)


def bend_images(images: torch.Tensor, amp: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor,
                rounds: int = 6) -> torch.Tensor:
    """images [b, C, H, W] -> bent by the same map as `bend_splats` (bilinear; black outside): the
    output at y reads the input at the x with x + d(x) = y, found by fixed-point rounds x <- y - d(x),
    which converge where the bend's slope is under 1 (at `Augment.bend`'s largest, 0.1, a sample's
    steepest slope has a median of 0.32 and passes 1 in about 1% of samples)."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(*pixel_centers(h, w, images.dtype, images.device), indexing="ij")
    y = torch.stack([xs, ys], -1).reshape(1, h * w, 2).expand(b, -1, -1)  # [b, HW, 2]
    x = y
    for _ in range(rounds):
        x = y - bend(x, amp, freq, phase)
    grid = (2 * x - 1).reshape(b, h, w, 2)  # grid_sample's coordinates, align_corners=False
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def covariances(params: torch.Tensor):
    """params [..., 8] -> each Gaussian's covariance Sigma = L L^T as (xx, xy, yy) [...] each."""
    l11, l21, l22 = params[..., 2], params[..., 3], params[..., 4]
    return l11 * l11, l11 * l21, l21 * l21 + l22 * l22


def ink(params: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """params [b, N, 8], mask [b, N] -> each Gaussian's ink [b, N]: its mean color times its integral,
    2 pi |l11 l22| (the 3-sigma cut-off drops 1.1% of it); 0 where masked out."""
    w = params[..., 5:8].mean(-1) * 2 * math.pi * torch.abs(params[..., 2] * params[..., 4])
    return w if mask is None else w * mask


def blur_splats(params: torch.Tensor, sigma_px: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """params [b, N, 8], sigma_px [b] -> the splats of the image blurred by a Gaussian of sigma_px pixels."""
    l11, l22 = params[..., 2], params[..., 4]  # [b, N]
    xx, xy, yy = covariances(params)
    sx, sy = (sigma_px / width)[:, None] ** 2, (sigma_px / height)[:, None] ** 2  # [b, 1]
    s11, s21, s22 = xx + sx, xy, yy + sy  # Sigma + s^2 I
    n11 = torch.sqrt(s11)
    n21 = s21 / n11
    n22 = torch.sqrt(s22 - n21 * n21)
    gain = torch.abs(l11 * l22) / (n11 * n22)  # sqrt(det Sigma / det Sigma')
    return torch.cat([params[..., 0:2], torch.stack([n11, n21, n22], -1), params[..., 5:8] * gain[..., None]], -1)


def blur_images(images: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """images [b, C, H, W], sigma_px [b] -> each blurred by a normalized Gaussian (zero outside the
    frame, as a splat image's surroundings are for a digit); sigma 0 leaves an image as it is."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3 * float(sigma_px.max())))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)  # [K]
    s = sigma_px.to(images.dtype).clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (x[None, :] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [b, K]; sigma ~0: a unit impulse
    flat = images.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, 0)  # [b C, K]
    flat = F.conv2d(flat, k[:, None, None, :], padding=(0, radius), groups=b * c)
    flat = F.conv2d(flat, k[:, None, :, None], padding=(radius, 0), groups=b * c)
    return flat.reshape(b, c, h, w)


def gain_splats(params: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """params [b, N, 8], gain [b, 3] -> the colors scaled per channel."""
    return torch.cat([params[..., :5], params[..., 5:8] * gain[:, None, :]], -1)


def major_spread(xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """The ink's covariance [[xx, xy], [xy, yy]] -> its spread: the standard deviation along its major
    axis (the square root of the larger eigenvalue), which a turn leaves as it is and which, as MNIST's
    framing by the longer side, gives a thin 1 and a wide 0 one height."""
    half = (xx + yy) / 2
    return torch.sqrt((half + torch.sqrt(((xx - yy) / 2) ** 2 + xy * xy)).clamp_min(0))


def moments_splats(params: torch.Tensor, mask: torch.Tensor | None = None):
    """params [b, N, 8], mask [b, N] -> the ink's (mass [b], centroid [b, 2], second moments [b, 3]:
    xx, xy, yy about the centroid) in normalized coordinates, each Gaussian weighted by its `ink`; its
    own covariance adds to the spread."""
    w = ink(params, mask)  # [b, N]
    sxx, sxy, syy = covariances(params)  # [b, N] each
    total = w.sum(1)  # [b]
    safe = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
    mu = (w[..., None] * params[..., 0:2]).sum(1) / safe[:, None]  # [b, 2]
    d = params[..., 0:2] - mu[:, None]  # [b, N, 2]
    xx = (w * (sxx + d[..., 0] ** 2)).sum(1) / safe
    xy = (w * (sxy + d[..., 0] * d[..., 1])).sum(1) / safe
    yy = (w * (syy + d[..., 1] ** 2)).sum(1) / safe
    return total, mu, torch.stack([xx, xy, yy], -1)


def moments_images(images: torch.Tensor):
    """images [b, C, H, W] -> the same moments of the mean over channels, each pixel's ink at its center."""
    h, w = images.shape[-2:]
    m = images.mean(1)  # [b, H, W]
    ys, xs = pixel_centers(h, w, images.dtype, images.device)
    total = m.sum((1, 2))
    safe = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
    cx, cy = (m * xs).sum((1, 2)) / safe, (m * ys[:, None]).sum((1, 2)) / safe
    dx, dy = xs - cx[:, None, None], ys[:, None] - cy[:, None, None]  # [b, 1, W], [b, H, 1]
    cov = torch.stack([(m * q).sum((1, 2)) / safe for q in (dx * dx, dx * dy, dy * dy)], -1)  # [b, 3]
    return total, torch.stack([cx, cy], -1), cov


def level_splats(params: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = 1 << 22) -> torch.Tensor:
    """params [b, N, 8], mask [b, N] -> the ink's level [b]: the integral of I^2 over the integral of I,
    I the mean over the channels of the render without its 3-sigma cut-off (0 where there is no ink).
    A product of two Gaussians integrates to 2 pi sqrt(det S_i det S_j / det S) exp(-d^T S^-1 d / 2),
    S = S_i + S_j and d = mu_i - mu_j, so with each one's `ink` w the integral of I^2 is the sum over
    pairs of w_i w_j exp(-d^T S^-1 d / 2) / (2 pi sqrt(det S)): O(N^2) in time, taken `chunk` pairs at
    a time so that memory stays O(chunk). An affine map scales both integrals alike, so the level is
    the same after any framing."""
    b, n = params.shape[:2]
    w = ink(params, mask)  # [b, N]
    cov = covariances(params)  # xx, xy, yy [b, N] each
    square = params.new_zeros(b)  # the integral of I^2
    rows = max(1, chunk // max(1, b * n))
    for r in range(0, n, rows):
        i = slice(r, r + rows)
        a, h, d = (v[:, i, None] + v[:, None, :] for v in cov)  # [b, R, N]: S = S_i + S_j
        det = (a * d - h * h).clamp_min(1e-20)
        dx = params[:, i, None, 0] - params[:, None, :, 0]  # [b, R, N]
        dy = params[:, i, None, 1] - params[:, None, :, 1]
        quad = (d * dx * dx - 2 * h * dx * dy + a * dy * dy) / det
        pair = torch.exp(-0.5 * quad) / (2 * math.pi * det.sqrt())
        square = square + torch.einsum("bi,bij,bj->b", w[:, i], pair, w)
    return per_ink(square, w.sum(1))  # w.sum: the integral of I


def level_images(images: torch.Tensor) -> torch.Tensor:
    """images [b, C, H, W] -> the same level [b] of the mean over channels, summed over the pixels."""
    m = images.mean(1)  # [b, H, W]
    return per_ink((m * m).sum((1, 2)), m.sum((1, 2)))


def per_ink(square: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The level [b] from the integrals of I^2 and of I [b]: their ratio, 0 where there is no ink."""
    return torch.where(total > 1e-12, square / total.clamp_min(1e-12), torch.zeros_like(total))


def level_gain(level: torch.Tensor, target: float) -> torch.Tensor:
    """The gain [b] that takes inks of these levels [b] to `target`, within [1/4, 4]; 1 where there is no ink."""
    return torch.where(level > 1e-6, target / level.clamp_min(1e-6), torch.ones_like(level)).clamp(0.25, 4.0)


MAX_SLANT = 1.0  # the largest shear `canonical_map` undoes: 45 degrees of slant


def canonical_map(total: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, target: float | torch.Tensor,
                  deskew: float = 0.0):
    """The map taking an image with these moments (`moments_images`) to its ink centered at spread
    `target` (a float, or one per sample [b]): (A, t). `deskew` first shears x along y so that the
    ink's x no longer drifts with its y (x -> x - (xy / yy) y, at most `MAX_SLANT`): a slanted stroke
    stands upright, as in the classic deskewing of MNIST. An image with no ink (or a negative total)
    keeps its place; the zoom stays within [1/4, 4]."""
    xx, xy, yy = cov.unbind(-1)  # [b] each
    slant = torch.zeros_like(xy)
    if deskew:
        slant = torch.where(yy > 1e-8, -deskew * xy / yy.clamp_min(1e-8), slant).clamp(-MAX_SLANT, MAX_SLANT)
        # the sheared ink's moments: S C S^T with S = [[1, slant], [0, 1]]
        xx, xy = xx + 2 * slant * xy + slant * slant * yy, xy + slant * yy
    spread = major_spread(xx, xy, yy)
    usable = (total > 1e-6) & (spread > 1e-4)
    zoom = torch.where(usable, target / spread.clamp_min(1e-4), torch.ones_like(spread)).clamp(0.25, 4.0)
    slant = torch.where(usable, slant, torch.zeros_like(slant))
    S = torch.eye(2, dtype=mu.dtype, device=mu.device).repeat(len(mu), 1, 1)  # [b, 2, 2]
    S[:, 0, 1] = slant
    A = S * zoom[:, None, None]
    t = torch.where(usable[:, None], -torch.einsum("bij,bj->bi", A, mu - 0.5), torch.zeros_like(mu))
    return A, t


def canonical_splats(params: torch.Tensor, mask: torch.Tensor | None, target: float | torch.Tensor,
                     deskew: float = 0.0) -> torch.Tensor:
    """params [b, N, 8] moved and scaled (and deskewed) so that their ink is centered with spread `target`."""
    return warp_splats(params, *canonical_map(*moments_splats(params, mask), target, deskew))


def canonical_images(images: torch.Tensor, target: float | torch.Tensor, deskew: float = 0.0) -> torch.Tensor:
    """images [b, C, H, W] moved and scaled (and deskewed) so that their ink is centered with spread `target`."""
    return warp_images(images, *canonical_map(*moments_images(images), target, deskew))
