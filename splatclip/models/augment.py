"""Random augmentation for a training stage (`stages.N.options.augment`): on images for the RGB
encoder, exactly on splats for the splat encoder (`splatclip.warps`), and on both at once when a
frozen teacher embeds the source image of each splat sample, so that student and teacher see one
transformed image (docs/method.md, 'Augmentation in splat space').

Each sample draws its own rotation, zoom, shift, blur and gain, a smooth bend of its shape (exact on
splats to first order), and, for images only, a change of stroke width, from torch's generator,
which the train loop seeds and checkpoints; and, for a model that frames its input by its ink, a
zoom after that framing (`reframe`), which the model applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from splatclip.warps import bend_images, bend_splats, blur_images, blur_splats, gain_splats, warp_images, warp_splats


class Augment(BaseModel):
    """The ranges each sample's transform is drawn from; the defaults leave a sample as it is."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    rotate: float = Field(0.0, ge=0, le=180, description="Largest rotation, degrees either way.")
    scale: tuple[float, float] = Field((1.0, 1.0), description="Range of the zoom about the center (log-uniform).")
    shift: float = Field(0.0, ge=0, le=0.5, description="Largest shift in x and in y, a fraction of the image's side.")
    blur: float = Field(0.0, ge=0, le=0.2, description="Largest Gaussian blur, sigma as a fraction of the image's "
                        "side (uniform from 0).")
    gain: tuple[float, float] = Field((1.0, 1.0), description="Range of the contrast gain: every color times it.")
    stroke: float = Field(0.0, ge=0, le=0.2, description="Largest change of stroke width, a fraction of the image's "
                          "side, thicker or thinner (dilation or erosion). Images only: it has no exact form on splats.")
    reframe: float = Field(1.0, ge=1, le=2, description="Largest error of the model's own framing "
                           "(`model.canonical_spread`): after the model centers and zooms a sample by its ink, a "
                           "further zoom by up to this factor either way (log-uniform), so that ink the framing "
                           "sizes otherwise (compact typeset glyphs, wide writing) is still read. Exact on splats; "
                           "needs model.canonical_spread.")
    bend: float = Field(0.0, ge=0, le=0.1, description="Largest bend of the shape: a smooth displacement of "
                        "the plane (a sum of 4 sine waves, 1 to 2 sides long), its root-mean-square size a fraction of "
                        "the image's side (uniform from 0; 0.05 is 1.4 pixels of a 28-pixel digit). How one "
                        "writer's digit differs from another's. Exact on splats to first order (docs/method.md).")
    share: float = Field(1.0, ge=0, le=1, description="The share of samples transformed; the others pass as they are.")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("scale", "gain"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 4:
                raise ValueError(f"{name} must be a range [low, high] with 0 < low <= high <= 4, got [{lo}, {hi}]")
        return self


@dataclass
class Draw:
    """One batch's transforms: A [b, 2, 2] and t [b, 2] (normalized coordinates), blur sigma [b] and
    stroke radius [b] as fractions of the side, gain [b, 3], the zoom after the model's framing [b]
    (`GSCLIP.view`; the model applies it, not `augment_images`/`augment_splats`), and the bend's waves
    (`warps.bend`: amplitudes [b, K, 2], frequencies [b, K, 2], phases [b, K]; None without a bend)."""

    A: torch.Tensor
    t: torch.Tensor
    sigma: torch.Tensor
    gain: torch.Tensor
    stroke: torch.Tensor
    reframe: torch.Tensor
    bend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


BEND_WAVES = 4  # sine waves in a bend
BEND_CYCLES = (0.5, 1.0)  # their frequencies, cycles per side: waves 1 to 2 sides long


def draw(settings: Augment, b: int, device=None) -> Draw:
    """Each of b samples' transform, uniform within the settings' ranges."""
    def uniform(lo: float, hi: float, *shape) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape)

    angle = uniform(-math.radians(settings.rotate), math.radians(settings.rotate))
    zoom = torch.exp(uniform(*(math.log(v) for v in settings.scale)))
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    A = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [b, 2, 2]
    t = uniform(-settings.shift, settings.shift, 2)  # [b, 2]
    sigma, stroke = uniform(0, settings.blur), uniform(-settings.stroke, settings.stroke)
    gain = uniform(*settings.gain)[:, None].repeat(1, 3)  # [b, 3]: contrast, the same on every channel
    kept = torch.rand(b) >= settings.share  # [b]: these pass as they are
    # drawn last, and only when asked for: settings without it draw the same transforms as before it
    reframe = torch.exp(uniform(-math.log(settings.reframe), math.log(settings.reframe))) if settings.reframe > 1 \
        else torch.ones(b)
    A[kept], t[kept], sigma[kept], gain[kept], stroke[kept], reframe[kept] = torch.eye(2), 0.0, 0.0, 1.0, 0.0, 1.0
    bend = None
    if settings.bend > 0:  # after the reframe, for the same reason
        size = uniform(0, settings.bend)  # [b]: the bend's root-mean-square displacement
        size[kept] = 0.0
        amp = torch.randn(b, BEND_WAVES, 2) * (size / math.sqrt(BEND_WAVES))[:, None, None]  # E|d|^2 = size^2
        direction = uniform(0, 2 * math.pi, BEND_WAVES)  # [b, K]
        cycles = uniform(*BEND_CYCLES, BEND_WAVES)
        freq = torch.stack([torch.cos(direction), torch.sin(direction)], -1) * cycles[..., None]  # [b, K, 2]
        bend = tuple(x.to(device) for x in (amp, freq, uniform(0, 2 * math.pi, BEND_WAVES)))
    return Draw(*(x.to(device) for x in (A, t, sigma, gain, stroke, reframe)), bend)


def max_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """x [..., H, W] -> the maximum over each (2r+1)^2 square, black (0) outside: rows, then columns
    (several times faster than max_pool2d at stride 1 on a CPU)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r))
    rows = torch.stack([padded[..., i : i + h, :] for i in range(2 * r + 1)]).amax(0)  # [..., H, W + 2r]
    return torch.stack([rows[..., j : j + w] for j in range(2 * r + 1)]).amax(0)


def stroke_width(images: torch.Tensor, half_px: torch.Tensor) -> torch.Tensor:
    """images [b, C, H, W], half_px [b] (signed, in half pixels) -> strokes grown (> 0) or shrunk (< 0)
    by that much on each side: a square's dilation or erosion on the image at twice the size."""
    out = images.clone()
    for r in half_px.unique().tolist():
        if r == 0:
            continue
        rows = half_px == r
        big = F.interpolate(images[rows], scale_factor=2, mode="nearest")
        big = max_filter(big, r) if r > 0 else -max_filter(-big, -r)
        out[rows] = F.avg_pool2d(big, 2)
    return out


def augment_images(images: torch.Tensor, d: Draw) -> torch.Tensor:
    """images [b, C, S, S] in [0, 1] -> stroke width, then bend, warp, blur and gain (as on splats)."""
    side = images.shape[-1]
    images = stroke_width(images, torch.round(d.stroke * side * 2).long())
    if d.bend is not None:
        images = bend_images(images, *d.bend)
    images = blur_images(warp_images(images, d.A, d.t), d.sigma * side)
    return images * d.gain[:, :, None, None]


def augment_splats(params: torch.Tensor, d: Draw) -> torch.Tensor:
    """params [b, N, 8] -> bend (to first order), warp, blur and gain, exactly (stroke width is not
    drawn for splats)."""
    if d.bend is not None:
        params = bend_splats(params, *d.bend)
    params = blur_splats(warp_splats(params, d.A, d.t), d.sigma, 1, 1)  # sigma in normalized units
    return gain_splats(params, d.gain)
