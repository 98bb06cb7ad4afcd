"""Decode untrusted images safely and crop them the way CLIP does (center square, then resize), or pad
them square, or cut them to the square around their ink (`around_ink`); optionally bring their ground
to black (`to_black_ground`), drop ink apart from a digit (`drop_clutter`) and thin a heavy pen's
strokes (`thin_strokes`).

Decoding is bounded before any pixel is read: only the accepted formats are opened, and the
declared size must pass the pixel and aspect-ratio limits. Cropping takes the center square of the
short side in source coordinates first and resizes only that square (box-reduced by whole factors
first when it is much larger), so a 40000x1 image costs what a 1x1 one does, never a 224x8.96M
intermediate.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from splatclip.fitting.prune import REC709
from splatclip.platform.specs import DEFAULT_LIMITS, ShardLimits

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members of a shard's sample that can hold its image


def image_member(sample: dict) -> str | None:
    """The member of a shard's sample that holds its image (the first of IMAGE_EXTS), or None."""
    return next((e for e in IMAGE_EXTS if e in sample), None)


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode(data: bytes, limits: ShardLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3] RGB, EXIF orientation applied, within `limits` (formats,
    pixels, aspect ratio). Raises ImageError only.

    Every mode becomes 8-bit RGB the same way (`to_rgb`).
    """
    if not data:
        raise ImageError("empty", "zero bytes")
    formats, max_pixels, max_aspect = limits.image_formats, limits.max_image_pixels, limits.max_aspect_ratio
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageError("undecodable", f"{w}x{h} pixels")
            if w * h > max_pixels:
                raise ImageError("too_large", f"{w}x{h} exceeds {max_pixels} pixels")
            if max(w, h) > max_aspect * min(w, h):
                raise ImageError("aspect_ratio", f"{w}x{h} is beyond the aspect-ratio limit {max_aspect:g}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise ImageError("undecodable", f"not an image of the accepted formats ({', '.join(formats)})") from None
    except MemoryError:
        raise ImageError("too_large", "out of memory while decoding") from None
    except Exception as err:  # a decoder's own error on damaged data: OSError, SyntaxError, struct.error, ...
        reason = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise ImageError(reason, f"{type(err).__name__}: {err}"[:300]) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation
        pass
    try:
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError("undecodable", f"{type(err).__name__}: {err}"[:300]) from None


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any mode Pillow opens -> uint8 [H, W, 3] RGB, the same way for every source (no level depends
    on what the image holds, so a dark image stays dark):
    - 1, L, P, RGB, CMYK (R = 255 (1 - C/255)(1 - K/255)), YCbCr (JPEG's full-range BT.601), HSV:
      Pillow's conversions, which are these standard ones;
    - transparency (LA, La, PA, RGBA, RGBa, P with a transparent color): composited on white;
    - 16 bits (I;16, I;16B, I;16L, and I, Pillow's 32-bit mode, which holds 16-bit PNG and TIFF
      levels): value / 257, so 65535 is 255 (I is clipped to 0..65535 first);
    - F (floating point): the [0, 1] convention of float images, value * 255, clipped;
    - an animated image: its first frame. Anything else is ImageError("unsupported_mode")."""
    img.seek(0)
    if img.mode.startswith("I;16") or img.mode == "I":
        levels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        img = Image.fromarray(np.floor(levels + 0.5).astype(np.uint8), "L")
    elif img.mode == "F":
        levels = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        img = Image.fromarray(np.floor(np.clip(levels, 0, 1) * 255.0 + 0.5).astype(np.uint8), "L")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ValueError as err:  # a mode with no conversion to RGB (LAB, ...)
        raise ImageError("unsupported_mode", f"mode {img.mode}: {err}") from None


def border(rgb: np.ndarray) -> np.ndarray:
    """The border pixels of an image: [H, W, ...] -> [2(H + W), ...] (uint8 [H, W, 3] -> [2(H + W), 3])."""
    return np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])


def square(rgb: np.ndarray, frame: str = "crop") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: "crop", the center square of the short side (S = min(H, W);
    CLIP's framing, for photos); "pad", the whole image centered on a square of the long side filled
    with its ground (S = max(H, W); the median of its border pixels: black for ink on black), so a
    digit cut out taller or wider than it is broad keeps all its ink; "ink", as "pad" (`crop` then
    cuts the square to its ink, `around_ink`)."""
    if frame not in ("crop", "pad", "ink"):
        raise ValueError(f"frame {frame!r}: crop, pad or ink")
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    if frame == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return rgb[top : top + side, left : left + side]
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.median(border(rgb), axis=0).astype(np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


INK_FILL = 0.6  # frame "ink": the ink's longer side fills at least this share of the square
INK_TAIL = 0.02  # and the ink's box leaves out this share of its weight at each end (a speck, a hot pixel)


def around_ink(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [S, S, 3] -> uint8 [s, s, 3] with size <= s <= S: where the image's ink fills under INK_FILL
    of its side and the image is larger than `size`, the square around the ink that it fills INK_FILL
    of (none smaller than `size`, within the image); else the image itself. The ink is what departs
    from the ground (the median of the border) by more than three times the border's own 90th
    percentile of departure (its noise), weighted by how far; its box holds all but INK_TAIL of that
    weight at each end along each axis, so a speck or a hot pixel far off does not widen it, and where
    noise or clutter spreads the ink over the page the square is the whole image."""
    side = rgb.shape[0]
    if side <= size:
        return rgb
    ground = np.median(border(rgb), axis=0)  # [3]
    away = np.abs(rgb.astype(np.float32) - ground.astype(np.float32)).max(-1)  # [S, S]
    weight = np.maximum(away - 3.0 * np.percentile(border(away), 90), 0.0)  # [S, S]
    total = float(weight.sum())
    if total <= 0:
        return rgb
    box = []
    for profile in (weight.sum(1), weight.sum(0)):  # [S] rows, then columns
        cum = np.cumsum(profile) / total
        box.append((int(np.searchsorted(cum, INK_TAIL)), int(np.searchsorted(cum, 1 - INK_TAIL))))
    (top, bottom), (left, right) = box
    s = max(size, math.ceil(max(bottom - top + 1, right - left + 1) / INK_FILL))
    if s >= side:
        return rgb
    t = min(max(0, round((top + bottom + 1 - s) / 2)), side - s)
    lft = min(max(0, round((left + right + 1 - s) / 2)), side - s)
    return rgb[t : t + s, lft : lft + s]


def is_light(colour: np.ndarray) -> bool:
    """Whether an RGB colour [3] (0..255; an image's ground, the median of its border) is over half in
    luminance: dark ink on paper, where ink on black has a dark ground."""
    return float(colour @ np.asarray(REC709)) > 127.5


def on_light_ground(rgb: np.ndarray) -> bool:
    """Whether uint8 [H, W, 3]'s ground (the median of its border) `is_light`."""
    return is_light(np.median(border(rgb), axis=0))


def gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W]: its luminance (Rec. 709) in 0..1."""
    return rgb.astype(np.float32) @ np.asarray(REC709, np.float32) / 255.0


def disk(r: float) -> np.ndarray:
    """bool [2 int(r) + 1, 2 int(r) + 1]: the pixels within r of the center, a structuring element."""
    k = int(r)
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return xx * xx + yy * yy <= r * r


def erode_disk(x: np.ndarray, r: int) -> np.ndarray:
    """float [H, W] -> its grey erosion by `disk(r)`, edges reflected: what scipy's grey_erosion with that
    footprint gives, to the bit, at a cost that grows with r, not r^2. The disk is a stack of rows, each
    a centered run of 2 w + 1 pixels (w^2 + dy^2 <= r^2), and a minimum over a run is a 1-D minimum filter,
    one per distinct w over the whole image; the erosion is their minimum, each shifted by its dy."""
    h, w = x.shape
    if r < 1:
        return x.copy()
    padded = np.pad(x, r, mode="symmetric")  # [H + 2r, W + 2r]: scipy's "reflect"
    runs = {}  # half-width w -> the padded image's minimum over each row's run of 2 w + 1
    out = None
    for dy in range(-r, r + 1):
        half = math.isqrt(r * r - dy * dy)
        if half not in runs:
            runs[half] = ndimage.minimum_filter1d(padded, 2 * half + 1, axis=1)
        rows = runs[half][r + dy : r + dy + h, r : r + w]  # [H, W]
        out = rows.copy() if out is None else np.minimum(out, rows, out=out)
    return out


CLIPPED_SD = 0.3853  # the 65th percentile of a normal, in sds above its median


def to_black_ground(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3] with its ground at black and its ink light. The ground g is
    the median of the border pixels and its spread s their robust sd (1.4826 x their median absolute
    deviation; noise and uneven light; where the ground is clipped at black or white, at least the 65th
    percentile's distance from g, away from the clip, over 0.385), per channel. A pixel's ink is how far
    it is from g toward the ink's side, less 3 s, stretched so that the darkest ink possible is 255: on a
    light ground (luminance over half; dark ink on paper) (g - x - 3s) / (g - 3s), the image inverted; on
    a dark ground (x - g - 3s) / (255 - g - 3s), which leaves ink on a clean black ground as it is.
    Clipped to 0..255: ink lighter than paper is ground, and so is the ground's own noise. So digits
    written dark on paper read as the light-on-black digits a model trained on MNIST knows."""
    edge = border(rgb).astype(np.float32)  # [2(H + W), 3]
    ground = np.median(edge, axis=0)  # [3]
    floor = 3 * 1.4826 * np.median(np.abs(edge - ground), axis=0)  # [3]
    light = is_light(ground)
    # a ground at the end of the range (black; white paper) clips its noise, and the deviations of the clipped
    # half read 0 however noisy the ground: where a tenth of the border or more sits at the end, the spread
    # is read on the side away from it too, from the 65th percentile's distance to the median (0.385 sd of
    # a normal; ink on up to 35% of the border does not reach it)
    end, tail = (255.0, ground - np.percentile(edge, 35, axis=0)) if light else \
        (0.0, np.percentile(edge, 65, axis=0) - ground)
    clipped = (edge == end).mean(axis=0) >= 0.1  # [3]
    floor = np.where(clipped, np.maximum(floor, 3 * tail / CLIPPED_SD), floor)  # [3]
    x = rgb.astype(np.float32)
    ink, full = (ground - x, ground) if light else (x - ground, 255.0 - ground)
    out = (ink - floor) * (255.0 / np.maximum(full - floor, 1.0))
    return np.clip(out, 0, 255).round().astype(np.uint8)


# A pen's width as a share of the image's side, measured on MNIST's training digits at 28x28 (`pen_width`):
# their median, 2.54 px, and their 95th percentile, 3.64 px. `thin_strokes` brings a heavier pen to the median.
PEN_WIDTH, HEAVY_PEN = 2.54 / 28, 3.64 / 28
WORK = 112  # thinning works on a square of this side (4x MNIST's 28), so a pen loses fractions of a pixel
MAX_THINNING = 0.2  # of the side, off each side of a stroke at most (a pen 3 px heavier a side at 28: 0.11)


def pen_width(ink: np.ndarray) -> float:
    """The mean width of the strokes of light ink on black, in pixels: float [H, W] in 0..1 -> twice the
    ink's area over its outline's length (its total variation; a stroke of length L and width w has area
    L w and an outline of 2 L). 0 for an image without ink."""
    gy, gx = np.gradient(ink)  # [H, W] each
    outline = float(np.sqrt(gx * gx + gy * gy).sum())
    return 2 * float(ink.sum()) / outline if outline > 1e-6 else 0.0


def thin_strokes(rgb: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] of light ink on black -> the same with a heavy pen's strokes thinned: where the
    pen is wider than HEAVY_PEN of the side (`pen_width` of the luminance), a grey erosion by a disk takes
    (width - PEN_WIDTH x S) / 2 pixels (at most MAX_THINNING x S) off each side of every stroke; any other
    image, and any on a light ground (`is_light`: dark ink on paper, whose erosion would thicken the ink;
    `to_black_ground` inverts it first), is returned as it is. The erosion works on the image resampled to WORK x WORK (bilinear; back
    down by the mean of each block where WORK is a multiple of S), so that edges stay antialiased and
    its cost does not grow with S. One step, not more: the width measure of a heavy pen's digit runs
    high (its loops close up), and eroding until it reads as MNIST's median erases strokes (thicker by
    2 px a side, the demo's models: RGB 0.936, splats 0.876 as it is; 0.932, 0.912 thinned once; 0.732,
    0.700 thinned to the median). A heavy pen's digits fit worse with few Gaussians and read worse."""
    side = rgb.shape[0]
    if on_light_ground(rgb):
        return rgb
    width = pen_width(gray(rgb)) / side  # a share of the side
    if width <= HEAVY_PEN:
        return rgb
    r = round(min((width - PEN_WIDTH) / 2, MAX_THINNING) * WORK)  # the erosion's radius, in WORK's pixels
    # a gray digit (as most are) is zoomed and eroded once, not once per channel: the same numbers
    channels = [0] if (rgb == rgb[..., :1]).all() else [0, 1, 2]
    eroded = [erode_disk(ndimage.zoom(rgb[..., c].astype(np.float32), WORK / side, order=1), r) for c in channels]
    big = np.stack(eroded * (3 // len(eroded)), -1)  # [WORK, WORK, 3]
    if WORK % side == 0:
        k = WORK // side
        small = big.reshape(side, k, side, k, 3).mean((1, 3))  # [S, S, 3]
    else:
        small = ndimage.zoom(big, (side / WORK, side / WORK, 1), order=1)  # [S, S, 3]
    return np.clip(small, 0, 255).round().astype(np.uint8)


# `drop_clutter`'s measures: shares of the image's side, but SPECK (a share of the digit's ink)
CENTER = 0.25  # the sd of the weight by nearness to the center that picks the digit among the pieces of ink
RULE = 0.75  # a straight run of ink this long is a line (a form's rule or box) where it reaches past the digit
CUT = 2 / 28  # by this much at both ends; and a piece with this much on the left or right edge was cut there
SPECK_GAP = 0.1  # pieces within this of each other are one group (a broken stroke's pieces stay with the digit)
SPECK = 0.15  # a group apart from the digit's with less ink than this share of the digit's is specks
EDGE = 2 / 28  # how far a dropped piece's faint edge reaches


def long_runs(mask: np.ndarray, length: int) -> np.ndarray:
    """bool [H, W] -> bool [H, W]: the pixels of `mask` on a run of at least `length` along their row."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # [H, W + 1]: +1 a run starts, -1 it ends
    (rows, starts), (_, stops) = np.nonzero(edges > 0), np.nonzero(edges < 0)  # in step, row by row
    long = stops - starts >= length
    marks = np.zeros((h, w + 1), np.int32)  # +1 where a long run starts, -1 where it ends
    np.add.at(marks, (rows[long], starts[long]), 1)
    np.add.at(marks, (rows[long], stops[long]), -1)
    return np.cumsum(marks, axis=1)[:, :w] > 0


def digit_piece(ink: np.ndarray, lum: np.ndarray):
    """The pieces of `ink` (bool [S, S], 8-connected) -> (labels [S, S], their count, the digit's label: the
    piece with the most ink `lum` weighted by nearness to the center, a Gaussian of sd CENTER of the side;
    0 without ink)."""
    side = ink.shape[0]
    pieces, n = ndimage.label(ink, structure=np.ones((3, 3)))  # [S, S]: 0 off the ink, 1..n
    if n == 0:
        return pieces, 0, 0
    y, x = np.mgrid[0:side, 0:side] - (side - 1) / 2
    near = np.exp(-(y * y + x * x) / (2 * (CENTER * side) ** 2))  # [S, S]
    return pieces, n, 1 + int(np.argmax(ndimage.sum_labels(lum * ink * near, pieces, np.arange(1, n + 1))))


def past(box, main, margin: int, axis: int) -> bool:
    """Whether a box ((rows, columns) slices) reaches `margin` pixels or more past `main` at both ends along
    `axis`."""
    return box[axis].start <= main[axis].start - margin and box[axis].stop >= main[axis].stop + margin


def thickness(ink: np.ndarray, box) -> int:
    """The rows of a row-wise run's box ((rows, columns) slices) and of every row next to them, up and
    down, whose ink covers half of its columns or more: a line's own thickness with its soft edges; a heavy
    stroke's whole width."""
    top, bottom = box[0].start, box[0].stop
    while top > 0 and ink[top - 1, box[1]].mean() >= 0.5:
        top -= 1
    while bottom < len(ink) and ink[bottom, box[1]].mean() >= 0.5:
        bottom += 1
    return bottom - top


def drop_clutter(rgb: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] of light ink on black -> the same with the ink apart from the digit set to black.
    The ink is the luminance over a quarter of its 99th percentile. First a form's lines: a run of ink
    along a row RULE of the side long or more (`long_runs`) is a line when it is at most CUT of the side
    thick (`thickness`) and reaches CUT past the digit at both ends (the digit found without the runs):
    a rule under the digit, ruled paper, a box's top and bottom; a digit's own long stroke (a 7's bar)
    ends with the digit, and stays. Only rows: a digit's upright strokes (a 1, a 4's stem) are as long
    and thin as a line. Then the rest falls into pieces (8-connected); the digit is the piece with the
    most ink weighted by nearness to the center (`digit_piece`), and another piece is clutter when
    - it was cut by the left or right edge (CUT of the side or more of it on that edge) and lies wholly
      beside the digit: a neighbour's fragment, where a string of digits was cut into one per image;
    - it reaches past the digit's box at both ends along both axes (a box around the digit), or along one
      where it touched a line (the sides of a box whose top and bottom were lines);
    - its group (the pieces within SPECK_GAP of the side of each other) is apart from the digit's and
      has under SPECK of the digit's ink: specks, dust (a stroke the pen broke into a line of pieces is
      one group with the digit).
    Clutter's pixels and its faint edge (pixels whose nearest ink is clutter, within EDGE of the side)
    go to black. Other clutter that touches the digit stays: it is one piece with it. An image on a
    light ground (`is_light`: `to_black_ground` inverts it first) is returned as it is."""
    side = rgb.shape[0]
    if on_light_ground(rgb):
        return rgb
    lum = gray(rgb)  # [S, S]
    if not (lum > 0).any():
        return rgb
    ink = lum > 0.25 * np.percentile(lum[lum > 0], 99)  # [S, S]
    cut = max(2, round(CUT * side))
    clutter = np.zeros_like(ink)  # [S, S]
    runs = long_runs(ink, round(RULE * side))  # [S, S]
    if runs.any():
        pieces, n, digit = digit_piece(ink & ~runs, lum)
        if digit:
            main = ndimage.find_objects(pieces)[digit - 1]
            lines = ndimage.label(runs)[0]  # [S, S]
            for k, box in enumerate(ndimage.find_objects(lines), 1):
                if thickness(ink, box) <= cut and past(box, main, cut, 1):
                    clutter |= lines == k
    pieces, n, digit = digit_piece(ink & ~clutter, lum)
    if n <= 1 and not clutter.any():  # the digit alone (most digits): nothing to drop
        return rgb
    index = np.arange(1, n + 1)
    mass = ndimage.sum_labels(lum * ink, pieces, index)  # [n]
    boxes = ndimage.find_objects(pieces)  # each piece's box: (rows, columns) slices
    # ink within SPECK_GAP of other ink (at hops of that reach from piece to piece) is one group
    groups, g = ndimage.label(ndimage.binary_dilation(pieces > 0, structure=disk(SPECK_GAP * side / 2)))  # [S, S]
    group_of = np.zeros(n + 1, np.int64)  # [n + 1]: each piece's group
    group_of[pieces[pieces > 0]] = groups[pieces > 0]
    group_mass = ndimage.sum_labels(lum * ink, groups * (pieces > 0), np.arange(g + 1))  # [g + 1]
    left, right = (np.bincount(pieces[:, e], minlength=n + 1) for e in (0, -1))  # [n + 1]: rows on each edge
    on_line = np.zeros(n + 1, bool)  # [n + 1]: pieces that touched a line (a box's sides, its top a line)
    on_line[pieces[ndimage.binary_dilation(clutter, structure=np.ones((3, 3)))]] = True
    for k in index:
        if k == digit:
            continue
        box, main = boxes[k - 1], boxes[digit - 1]
        beside = (left[k] >= cut and box[1].stop <= main[1].start) or (right[k] >= cut and box[1].start >= main[1].stop)
        speck = group_of[k] != group_of[digit] and group_mass[group_of[k]] < SPECK * mass[digit - 1]
        rows, columns = past(box, main, 1, 0), past(box, main, 1, 1)
        around = (rows and columns) or (on_line[k] and (rows or columns))
        if beside or around or speck:
            clutter |= pieces == k
    if not clutter.any():
        return rgb
    # clutter's pixels, and the faint edge around it: pixels whose nearest ink is clutter
    dist, (iy, ix) = ndimage.distance_transform_edt(~ink, return_indices=True)  # [S, S], [S, S] each
    out = rgb.copy()
    out[clutter[iy, ix] & (dist <= max(1.0, EDGE * side))] = 0
    return out


def crop(rgb: np.ndarray, size: int, frame: str = "crop", ground: str = "keep", clutter: str = "keep",
         stroke: str = "keep") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the image made square (`square`: the center square of
    the short side, or padded to the long side; with frame "ink", padded and then cut to the square
    around its ink where the ink is small in a large image, `around_ink`), resized to `size` with
    PIL's bicubic filter (antialiased when shrinking; what CLIP's own preprocessing uses), at any
    aspect ratio; then, with ground "black", its ground brought to black (`to_black_ground`; "keep":
    as it is), with clutter "drop", ink apart from the digit set to black (`drop_clutter`; "keep": as
    it is), and with stroke "thin", a heavy pen's strokes thinned (`thin_strokes`; "keep": as they
    are). Needs no torch, so decode workers stay small."""
    squared = square(rgb, frame)
    if frame == "ink":
        squared = around_ink(squared, size)
    squared = Image.fromarray(np.ascontiguousarray(squared))
    side = squared.size[0]
    factor = side // (2 * size)
    if factor >= 2:  # a box filter by a whole factor first: the bicubic below then works on <= 4x size
        squared = squared.reduce(factor)
    if squared.size != (size, size):
        squared = squared.resize((size, size), Image.Resampling.BICUBIC)
    out = np.array(squared, dtype=np.uint8)
    if ground not in ("keep", "black"):
        raise ValueError(f"ground {ground!r}: keep or black")
    if clutter not in ("keep", "drop"):
        raise ValueError(f"clutter {clutter!r}: keep or drop")
    if stroke not in ("keep", "thin"):
        raise ValueError(f"stroke {stroke!r}: keep or thin")
    if ground == "black":
        out = to_black_ground(out)
    if clutter == "drop":
        out = drop_clutter(out)
    return thin_strokes(out) if stroke == "thin" else out


def clip_crop(rgb: np.ndarray, size: int, **view: str):
    """uint8 [H, W, 3] -> float32 tensor [3, size, size] in [0, 1] (`crop`, its frame, ground, clutter and stroke
    as `view` says; for the fitter)."""
    import torch  # here, not at the top: the decode stage imports this module and never needs torch

    return torch.from_numpy(crop(rgb, size, **view)).permute(2, 0, 1).float().div_(255.0).contiguous()


def load_file(path: str, size: int, limits: ShardLimits = DEFAULT_LIMITS, **view: str):
    """An image file -> (float32 tensor [3, size, size] (`clip_crop`), source bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    return clip_crop(decode(data, limits), size, **view), len(data)
