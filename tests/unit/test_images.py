"""Decoding what real corpora hold: EXIF rotation, grayscale, RGBA, CMYK, 16-bit; and failures."""

import io

import numpy as np
import pytest
from PIL import Image

from splatclip.fitting.images import ImageError, clip_crop, decode
from splatclip.platform.specs import ShardLimits


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
        decode(big, ShardLimits(max_image_pixels=1_000_000))
    assert info.value.reason == "too_large"


def test_clip_crop_short_side_then_center():
    rgb = np.zeros((100, 300, 3), np.uint8)
    rgb[:, 100:200] = 255  # the center third is white
    out = clip_crop(rgb, 50)
    assert out.shape == (3, 50, 50) and out.mean() > 0.95


def test_a_long_thin_image_costs_what_its_crop_does(monkeypatch):
    line = encoded(Image.new("RGB", (40000, 1), (200, 30, 30)), "PNG")  # the 198-byte PNG of the issue
    rgb = np.asarray(Image.open(io.BytesIO(line)).convert("RGB"))  # past any aspect limit decode allows
    resized, resize = [], Image.Image.resize

    def recording(self, size, *args, **kwargs):
        resized.append(self.size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    out = clip_crop(rgb, 224)  # center square 1x1, then resized: no 224 x 8.96M intermediate
    assert out.shape == (3, 224, 224)
    assert resized and all(w * h <= (4 * 224) ** 2 for w, h in resized)  # only the square, never the line
    assert abs(out[0].mean().item() - 200 / 255) < 0.01
    with pytest.raises(ImageError) as info:
        decode(line, ShardLimits(max_aspect_ratio=20))
    assert info.value.reason == "aspect_ratio"


def test_crop_is_taken_in_source_coordinates_before_resizing():
    rgb = np.zeros((3000, 1000, 3), np.uint8)
    rgb[1000:2000] = 255  # the center square is white, the rest black
    out = clip_crop(rgb, 64)
    assert out.shape == (3, 64, 64) and out.min() > 0.99


def test_only_the_accepted_formats_are_decoded():
    gif = encoded(Image.new("RGB", (16, 16)), "GIF")
    with pytest.raises(ImageError) as info:
        decode(gif)
    assert info.value.reason == "undecodable" and "JPEG, PNG, WEBP" in str(info.value)
    assert decode(gif, ShardLimits(image_formats=["GIF"])).shape == (16, 16, 3)


def test_damaged_exif_keeps_the_stored_orientation():
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 99  # no such orientation
    assert decode(encoded(img, "JPEG", exif=exif)).shape == (10, 30, 3)
