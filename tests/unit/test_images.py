"""Decoding what real corpora hold: EXIF rotation, grayscale, RGBA, CMYK, 16-bit; and failures."""

import io

import numpy as np
import pytest
from PIL import Image

from splatclip.fitting.images import ImageError, clip_crop, decode


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb():
    gray = Image.fromarray(np.full((10, 20), 128, np.uint8), "L")
    assert decode(encoded(gray, "PNG")).shape == (10, 20, 3)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: composited on white
    assert decode(encoded(rgba, "PNG"))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    out = decode(encoded(cmyk, "JPEG"))
    assert out.shape == (8, 8, 3) and out[0, 0, 0] > 200 and out[0, 0, 1] < 60
    deep = Image.fromarray(np.full((6, 6), 65535, np.uint16))
    assert decode(encoded(deep, "PNG"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert decode(encoded(img, "JPEG", exif=exif)).shape == (30, 10, 3)


@pytest.mark.parametrize("data, reason", [(b"", "empty"), (b"not an image", "undecodable")])
def test_failures_name_their_reason(data, reason):
    with pytest.raises(ImageError) as info:
        decode(data)
    assert info.value.reason == reason


def test_bomb_is_refused_before_decoding():
    big = encoded(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageError) as info:
        decode(big, max_pixels=1_000_000)
    assert info.value.reason == "too_large"


def test_clip_crop_short_side_then_center():
    rgb = np.zeros((100, 300, 3), np.uint8)
    rgb[:, 100:200] = 255  # the center third is white
    out = clip_crop(rgb, 50)
    assert out.shape == (3, 50, 50) and out.mean() > 0.95
