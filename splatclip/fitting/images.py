"""Decode images safely and crop them the way CLIP does (short side to size, center crop)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode(data: bytes, max_pixels: int = 89_478_485) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3] RGB, EXIF orientation applied.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images become 8-bit RGB.
    """
    if not data:
        raise ImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageError("too_large", f"{img.width}x{img.height} exceeds {max_pixels} pixels")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise ImageError("undecodable", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("truncated" if "truncated" in str(err).lower() else "undecodable", str(err)) from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def clip_crop(rgb: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, size, size] in [0, 1]: short side to `size`, center crop."""
    img = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()[None] / 255.0
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        img = F.interpolate(img, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[0, :, top : top + size, left : left + size].clamp(0, 1).contiguous()


def load_file(path: str, size: int, max_pixels: int = 89_478_485) -> tuple[torch.Tensor, int]:
    """An image file -> ([3, size, size], source bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    return clip_crop(decode(data, max_pixels), size), len(data)
