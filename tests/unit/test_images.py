"""Decoding what real corpora hold: EXIF rotation, grayscale, RGBA, CMYK, 16-bit; and failures."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

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


# Every mode Pillow opens, through a format that keeps it, against a conversion written out here
# (docs: `fitting.images.to_rgb`): levels never depend on what an image holds.
RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (6, 9), dtype=np.uint8)
RGB = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (6, 9), dtype=np.uint8)
DEEP = RNG.integers(0, 4000, (6, 9)).astype(np.uint16)  # a dark 16-bit image: levels far below 65535
ALL_FORMATS = ShardLimits(image_formats=["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])


def over_white(rgb, alpha):
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


def cases():
    palette = RGB.reshape(-1, 3)[:16]
    indices = (GRAY % 16).astype(np.uint8)
    p = Image.fromarray(indices, "P")
    p.putpalette(palette.flatten().tolist())
    pt = p.copy()
    pt.info["transparency"] = 3  # index 3 is transparent
    cmyk = RNG.integers(0, 256, (6, 9, 4), dtype=np.uint8)
    ycc = RNG.integers(16, 240, (6, 9, 3)).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    floats = RNG.uniform(-0.2, 1.2, (6, 9)).astype(np.float32)
    i32 = RNG.integers(-100, 70000, (6, 9)).astype(np.int32)
    return {
        "1": (Image.fromarray(GRAY > 127), "PNG", np.repeat(np.where(GRAY > 127, 255, 0)[..., None], 3, -1)),
        "L": (Image.fromarray(GRAY, "L"), "PNG", np.repeat(GRAY[..., None], 3, -1)),
        "LA": (Image.fromarray(np.stack([GRAY, ALPHA], -1), "LA"), "PNG",
               over_white(np.repeat(GRAY[..., None], 3, -1), ALPHA)),
        "P": (p, "PNG", palette[indices]),
        "P+transparency": (pt, "PNG", np.where((indices == 3)[..., None], 255, palette[indices])),
        "RGB": (Image.fromarray(RGB, "RGB"), "PNG", RGB),
        "RGBA": (Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), "PNG", over_white(RGB, ALPHA)),
        "CMYK": (Image.fromarray(cmyk, "CMYK"), "TIFF",
                 255 * (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)),
        "I;16": (Image.fromarray(DEEP), "PNG", np.repeat((DEEP / 257)[..., None], 3, -1)),
        "I;16 TIFF": (Image.fromarray(DEEP), "TIFF", np.repeat((DEEP / 257)[..., None], 3, -1)),
        "I": (Image.fromarray(i32, "I"), "TIFF", np.repeat((np.clip(i32, 0, 65535) / 257)[..., None], 3, -1)),
        "F": (Image.fromarray(floats, "F"), "TIFF", np.repeat((np.clip(floats, 0, 1) * 255)[..., None], 3, -1)),
        "YCbCr": (Image.fromarray(ycc.astype(np.uint8), "YCbCr"), "TIFF",
                  np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)),
    }


@pytest.mark.parametrize("mode", list(cases()))
def test_every_mode_converts_the_standard_way(mode):
    img, fmt, want = cases()[mode]
    got = decode(encoded(img, fmt), ALL_FORMATS)
    assert got.shape == (6, 9, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(np.float64) - np.clip(want, 0, 255)).max() <= 1.0, mode


def test_a_dark_16_bit_image_stays_dark():
    dark = np.zeros((8, 8), np.uint16)
    dark[:, 4:] = 200  # 200 of 65535: level 1 of 255, not 200 (its levels are not stretched)
    assert decode(encoded(Image.fromarray(dark), "PNG"))[:, :, 0].tolist() == [[0] * 4 + [1] * 4] * 8
    assert decode(encoded(Image.fromarray(np.full((8, 8), 3000, np.uint16)), "PNG")).max() == 12


def test_an_animated_image_is_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    assert decode(buf.getvalue()).reshape(-1, 3).mean(0).round().tolist() == [200, 10, 10]
    gif = io.BytesIO()
    frames[1].save(gif, format="GIF", save_all=True, append_images=[frames[2], frames[0]])
    got = decode(gif.getvalue(), ALL_FORMATS).reshape(-1, 3).mean(0)
    assert np.abs(got - [10, 200, 10]).max() < 8  # GIF's palette quantizes


def test_fitted_colours_are_the_converted_ones_region_by_region():
    """Through the fitter: two flat regions per image, each mode's render has the reference colour."""
    import torch

    from splatclip.cuda import render
    from splatclip.fitting.fitter import fit_batch
    from splatclip.platform.specs import FitParams

    def halves(mode, left, right):
        arr = np.empty((32, 32) + np.shape(left), np.uint16 if mode is None else np.uint8)
        arr[:, :16], arr[:, 16:] = left, right
        return Image.fromarray(arr, mode) if mode else Image.fromarray(arr)

    def reference(value):
        return np.asarray(value, np.float64).reshape(-1)[:3] / 255

    sources = [  # (image, format, reference colours of the left and right halves)
        (halves(None, 200, 40000), "PNG", ([0, 0, 0], [156] * 3)),
        (halves("LA", [90, 255], [200, 64]), "PNG", ([90] * 3, [200 * 64 / 255 + 255 * 191 / 255] * 3)),
        (halves("CMYK", [0, 128, 255, 0], [0, 0, 0, 128]), "TIFF", ([255, 127, 0], [127, 127, 127])),
        (halves("RGBA", [255, 0, 0, 128], [0, 0, 255, 255]), "PNG", ([255, 127, 127], [0, 0, 255])),
    ]
    images = torch.stack([clip_crop(decode(encoded(img, fmt), ALL_FORMATS), 32) for img, fmt, _ in sources])
    result = fit_batch(images, FitParams(gaussians=64, iterations=150, size=32, compile=False, backend="torch"))
    with torch.no_grad():
        out = render(result.splats.params, 32, 32, result.splats.mask).clamp(0, 1)  # [4, 3, 32, 32]
    for rendered, (_, _, (left, right)) in zip(out, sources):
        got_left, got_right = rendered[:, 4:28, 2:12].mean((1, 2)).numpy(), rendered[:, 4:28, 20:30].mean((1, 2)).numpy()
        assert np.abs(got_left - reference(left)).max() < 0.03 and np.abs(got_right - reference(right)).max() < 0.03


def test_pad_keeps_the_ink_a_crop_cuts_off_and_fills_with_the_ground():
    from splatclip.fitting.images import crop, square
    from splatclip.pipelines.samples import decode_image

    tall = np.zeros((40, 20, 3), np.uint8)  # a digit cut out taller than it is wide, ink at its ends
    tall[2:6, 6:14] = tall[34:38, 6:14] = tall[6:34, 9:11] = 255
    cropped, padded = square(tall, "crop"), square(tall, "pad")
    assert cropped.shape == (20, 20, 3) and padded.shape == (40, 40, 3)
    assert cropped.sum() < 0.6 * tall.sum()  # the bars at top and bottom are gone
    assert padded.sum() == tall.sum() and (padded[:, :10] == 0).all()  # all the ink, on black
    assert square(255 - tall, "pad")[:, :10].min() == 255  # ink on white is padded with white
    square_image = tall[:20]
    assert square(square_image, "pad") is square_image and square(square_image, "crop") is square_image
    # what a model reads: the top bar is in the padded view (ink across its top rows), not in the crop's
    sample = {"png": encoded(Image.fromarray(tall), "PNG")}
    views = {frame: decode_image(sample, 28, frame=frame)[0] for frame in ("crop", "pad")}  # [28, 28]
    assert crop(tall, 28, "pad").shape == (28, 28, 3)
    assert (views["pad"][1:5] > 0.5).sum(1).max() >= 5 and (views["crop"][1:5] > 0.5).sum(1).max() <= 3
    with pytest.raises(ValueError, match="crop, pad or ink"):
        square(tall, "stretch")


def test_frame_ink_cuts_a_large_page_to_its_ink_and_leaves_digits_that_fill_their_frame_as_they_are():
    from splatclip.datasets import digits
    from splatclip.fitting.images import INK_FILL, around_ink, crop

    plain = [np.asarray(Image.open(io.BytesIO(s["png"]))) for s in digits("test", limit=40)]  # [28, 28] each
    rgb = lambda a: np.repeat(np.asarray(a, np.uint8)[..., None], 3, -1)  # noqa: E731  [H, W] -> [H, W, 3]
    for digit in plain:  # MNIST's framing, at its own size and scanned at twice it: the same image
        image = rgb(digit)
        assert around_ink(image, 28) is image and np.array_equal(crop(image, 28, "ink"), crop(image, 28, "pad"))
        big = rgb(Image.fromarray(digit).resize((56, 56), Image.Resampling.BICUBIC))
        assert around_ink(big, 28) is big
    rng = np.random.default_rng(0)
    for digit in plain:
        scan = np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.BICUBIC))
        for side, ground, noise in ((224, 0, 0), (168, 255, 0), (224, 0, 6)):
            page = np.zeros((side, side)) + ground
            top, left = rng.integers(0, side - 56 + 1, 2)
            page[top : top + 56, left : left + 56] += scan if ground == 0 else -0.8 * scan
            page = np.clip(page + rng.normal(0, noise, page.shape), 0, 255).round()
            page[rng.integers(side), rng.integers(side)] = 255 - ground  # a hot pixel anywhere
            cut = around_ink(rgb(page), 28)
            ink = np.abs(page - ground) > 64  # [S, S]
            ys, xs = np.nonzero(ink[top : top + 56, left : left + 56])
            long = max(np.ptp(ys), np.ptp(xs)) + 1
            # the ink (with its soft edge, up to 2 pixels a side) fills INK_FILL of the cut
            assert 28 <= len(cut) <= np.ceil((long + 4) / INK_FILL), (side, noise, len(cut), long)
            # all the digit's ink is in the cut
            kept = np.abs(cut[..., 0].astype(float) - ground) > 64
            assert kept.sum() >= ink[top : top + 56, left : left + 56].sum()
    # ink spread over the whole page (noise, many digits) leaves the page as it is
    spread = rgb(rng.integers(0, 256, (200, 200)))
    assert around_ink(spread, 28) is spread
    blank = np.zeros((100, 100, 3), np.uint8)
    assert around_ink(blank, 28) is blank


def test_ground_black_turns_ink_on_paper_into_ink_on_black_and_leaves_ink_on_black_as_it_is():
    import torch

    from splatclip.fitting.images import crop, to_black_ground
    from splatclip.pipelines.samples import decode_image

    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28, 3), np.uint8)
    digit[4:24, 12:16] = 255
    digit[4:8, 8:16] = 180  # a softer stroke
    digit[12, :] = 255  # ink that reaches the border (a minority of the border's pixels)
    assert (to_black_ground(digit) == digit).all()  # ink on a clean black ground: as it is
    assert (to_black_ground(255 - digit) == digit).all()  # black on white: inverted exactly
    # gray paper, the ink at 0.6 of the contrast, noise of sd 6 and light falling across the page
    fall = np.linspace(-10, 10, 28)[None, :, None]
    page = 210 * (1 - 0.6 * digit / 255.0) + fall + rng.normal(0, 6, digit.shape)
    out = to_black_ground(np.clip(page, 0, 255).round().astype(np.uint8)).astype(int)
    ground, ink = digit[..., 0] == 0, digit[..., 0] == 255
    assert (out[ground] == 0).mean() > 0.95 and out[ground].mean() < 2  # the ground is black, its noise gone
    assert out[ink].min() > 90 and out[ink].mean() > 110  # the ink light
    # a ground at black or white clips its noise: half its pixels read the end, and their median deviation
    # is 0 however noisy; the noise goes under black all the same, on black and on white paper alike
    for sd in (8, 16, 28):
        for noisy in (digit + rng.normal(0, sd, digit.shape), 255 - 0.8 * digit + rng.normal(0, sd, digit.shape)):
            out = to_black_ground(np.clip(noisy, 0, 255).round().astype(np.uint8)).astype(int)
            assert (out[ground] == 0).mean() > 0.95 and out[ink].mean() > 110, sd
    # a colour page: blue ink on yellowish paper becomes light ink on black in each channel's own scale
    paper = np.array([245, 235, 190], np.float32)
    colour = (paper - digit / 255.0 * (paper - np.array([30, 40, 120]))).round().astype(np.uint8)
    out = to_black_ground(colour)
    assert (out[ground] == 0).all() and (out[ink] > 90).all()
    # through the image paths: crop, and a shard sample's image as the RGB model reads it
    assert (crop(255 - digit, 28, ground="black") == digit).all()
    view = decode_image({"png": encoded(Image.fromarray(255 - digit), "PNG")}, 28, ground="black")  # [3, 28, 28]
    assert torch.equal(view, torch.from_numpy(digit).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match="keep or black"):
        crop(digit, 28, ground="white")


def test_stroke_thin_brings_a_heavy_pen_to_mnists_and_leaves_other_digits_as_they_are():
    from splatclip import datasets
    from splatclip.fitting.images import HEAVY_PEN, PEN_WIDTH, crop, pen_width, thin_strokes
    from splatclip.pipelines.samples import decode_image

    bar = np.zeros((28, 28), np.float32)
    bar[2:26, 10:13] = 1.0  # a stroke 3 px wide and 24 long
    assert pen_width(bar) == pytest.approx(3.0, rel=0.15) and pen_width(np.zeros((28, 28), np.float32)) == 0.0
    rgb = lambda gray: np.repeat(gray[..., None], 3, -1)  # noqa: E731 [28, 28] -> [28, 28, 3]
    width = lambda image: pen_width(image[..., 0].astype(np.float32) / 255)  # noqa: E731
    plain = [rgb(np.asarray(Image.open(io.BytesIO(s["png"])))) for s in datasets.digits("train", limit=200)]
    kept = sum(thin_strokes(d) is d for d in plain)
    assert kept >= 180  # MNIST's own pens: 95% are under the threshold, and are returned as they are
    for heavier in (1.0, 2.0, 3.0):  # a side, at 28 px: a felt pen to a marker
        for digit in plain[:10]:
            heavy = rgb(datasets.stroke(digit[..., 0], heavier))
            thin = thin_strokes(heavy)
            excess = width(heavy) - PEN_WIDTH * 28
            assert width(heavy) > HEAVY_PEN * 28 and width(heavy) - width(thin) > 0.45 * excess, (heavier, width(thin))
            assert width(thin) > PEN_WIDTH * 28  # thinned toward MNIST's pen, not erased
            assert (thin[..., 0] == thin[..., 2]).all() and thin.max() > 200  # gray stays gray, the ink full
    # through the image paths: crop after the ground, and a shard sample's image
    heavy = rgb(datasets.stroke(plain[0][..., 0], 2.0))
    assert (crop(255 - heavy, 28, ground="black", stroke="thin") == thin_strokes(heavy)).all()
    view = decode_image({"png": encoded(Image.fromarray(heavy), "PNG")}, 28, stroke="thin")  # [3, 28, 28]
    assert np.array_equal((view.permute(1, 2, 0).numpy() * 255).round(), thin_strokes(heavy))
    assert (thin_strokes(np.full((28, 28, 3), 255, np.uint8)) == 255).all()  # all ink: no outline, nothing to thin
    page = 255 - heavy  # the marker on paper, its ground kept: eroding the page would thicken the ink
    assert thin_strokes(page) is page and (crop(page, 28, stroke="thin") == page).all()
    # at any size alike: the pen is a share of the side, and the erosion works on WORK x WORK whatever the size
    share = width(thin_strokes(heavy)) / 28
    for side in (56, 100, 224):
        big = np.asarray(Image.fromarray(heavy).resize((side, side), Image.Resampling.BILINEAR))
        thin = thin_strokes(big)
        assert thin.shape == big.shape and abs(width(thin) / side - share) < 0.25 * share, side
    with pytest.raises(ValueError, match="keep or thin"):
        crop(heavy, 28, stroke="bold")


def test_the_fast_erosion_and_runs_are_scipys_and_a_row_scans_to_the_bit():
    from splatclip.fitting.images import disk, erode_disk, long_runs, thin_strokes

    rng = np.random.default_rng(0)
    for r in range(0, 24):  # every radius thin_strokes can take at WORK = 112 (at most 0.2 of it)
        x = (rng.random((int(rng.integers(20, 130)), int(rng.integers(20, 130)))) * 255).astype(np.float32)
        assert np.array_equal(erode_disk(x, r), ndimage.grey_erosion(x, footprint=disk(r)) if r else x), r

    def row_runs(mask, length):  # the reference: each row's runs, one by one
        out = np.zeros_like(mask)
        for y, row in enumerate(mask):
            x = 0
            while x < len(row):
                stop = x
                while stop < len(row) and row[stop]:
                    stop += 1
                if stop - x >= length:
                    out[y, x:stop] = True
                x = stop + 1
        return out

    for _ in range(200):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()
        length = int(rng.integers(1, 40))
        assert np.array_equal(long_runs(mask, length), row_runs(mask, length))
    # a coloured digit is thinned channel by channel, a gray one once: the same as each channel on its own
    heavy = ndimage.grey_dilation(np.pad(np.eye(20, dtype=np.uint8) * 255, 4), footprint=disk(3))  # [28, 28]
    colour = np.stack([heavy, heavy // 2, heavy // 3], -1)
    one = [thin_strokes(np.repeat(colour[..., c : c + 1], 3, -1))[..., 0] for c in range(3)]
    assert np.array_equal(thin_strokes(colour), np.stack(one, -1)) and not np.array_equal(one[0], heavy)


def test_clutter_drop_takes_what_lies_apart_from_the_digit_and_leaves_digits_as_they_are():
    from splatclip import datasets, shifted
    from splatclip.fitting.images import crop, drop_clutter
    from splatclip.pipelines.samples import decode_image

    rgb = lambda gray: np.repeat(np.asarray(gray, np.uint8)[..., None], 3, -1)  # noqa: E731 [S, S] -> [S, S, 3]
    gray = lambda sample: np.asarray(Image.open(io.BytesIO(sample["png"])))  # noqa: E731
    plain = [rgb(gray(s)) for s in datasets.digits("train", limit=300)]
    changed = [(d, drop_clutter(d)) for d in plain]
    changed = [(a, b) for a, b in changed if (a != b).any()]
    assert len(changed) <= 9  # MNIST's digits: a speck here and there, the digit itself never
    for a, b in changed:
        pieces, n = ndimage.label(a[..., 0] > 64, structure=np.ones((3, 3)))
        largest = pieces == 1 + np.argmax(np.bincount(pieces.ravel())[1:])
        assert (b[largest] == a[largest]).all() and b.sum() > 0.8 * a.sum()
    digit = rgb(gray(datasets.digits("test", limit=1)[0]))  # a 3 in rows 4-23, columns 7-20
    one = digit[..., 0] > 0

    def left_alone(image):  # the digit's own pixels as they were, every other pixel black
        return (image[one] == digit[one]).all() and image[~one].max() == 0

    neighbour = digit.copy()
    neighbour[5:20, 0:3] = 255  # a neighbour's stroke, cut by the left edge
    rule = digit.copy()
    rule[26, :] = 255  # a form's line under the digit, across the frame
    touching = digit.copy()
    touching[24, :] = 255  # the same line, under the digit's last row: one piece with it
    box = digit.copy()
    box[1, 1:27] = box[26, 1:27] = 255
    box[1:27, 1] = box[1:27, 26] = 255  # a box around it
    specks = digit.copy()
    specks[1, 25] = specks[26, 3] = specks[14, 26] = 200  # dust
    for cluttered in (neighbour, rule, box, specks):
        assert left_alone(drop_clutter(cluttered))
    cleared = drop_clutter(touching)
    assert cleared[24].sum() < 0.3 * touching[24].sum() and (cleared[:24] == digit[:24]).all()
    # what stays: a piece the pen broke off near the digit, a stroke of the digit's own that touches the
    # edge (a tight crop), a line shorter than the frame's, upright strokes however long
    broken = digit.copy()
    broken[2:4, 12:16] = 255  # a piece 1 row above the digit's top, within its columns
    tight = np.zeros((28, 28), np.uint8)
    tight[0:28, 12:15] = 255  # a 1 cut to its ink: from edge to edge
    tight[0:3, 8:12] = 255
    seven = np.zeros((28, 28), np.uint8)
    seven[4:6, 2:26] = 255  # a wide 7's bar, 24 px: as long as a line, but the digit ends with it
    seven[6:24, 22:25] = 255
    stem = np.zeros((28, 28), np.uint8)
    stem[0:28, 18:20] = 255  # a 4's stem from edge to edge, beside the rest of the 4
    stem[6:16, 8:10] = 255
    stem[15:17, 8:18] = 255
    for kept in (broken, rgb(tight), rgb(seven), rgb(stem), digit):
        assert drop_clutter(kept) is kept or (drop_clutter(kept) == kept).all()
    # a light ground (dark ink on paper, ground kept) and an empty image are returned as they are
    page = 255 - neighbour
    assert drop_clutter(page) is page
    empty = np.zeros((28, 28, 3), np.uint8)
    assert drop_clutter(empty) is empty
    # through the image paths: after the ground, and a shard sample's image
    assert (crop(255 - neighbour, 28, ground="black", clutter="drop") == drop_clutter(neighbour)).all()
    view = decode_image({"png": encoded(Image.fromarray(neighbour), "PNG")}, 28, clutter="drop")  # [3, 28, 28]
    assert np.array_equal((view.permute(1, 2, 0).numpy() * 255).round(), drop_clutter(neighbour))
    # the cluttered sets at any size alike: the rules are shares of the side
    samples = shifted.shifted_digits("cluttered", 3, limit=40)
    for side in (28, 56, 112):
        images = [crop(decode(s["png"]), side) for s in samples]
        cleared = [drop_clutter(image) for image in images]
        share = np.mean([b.sum() / a.sum() for a, b in zip(images, cleared)])
        assert 0.5 < share < 0.75, side  # a third of the ink is a neighbour's, a line or dust
        assert sum((a != b).any() for a, b in zip(images, cleared)) >= 36, side
    with pytest.raises(ValueError, match="keep or drop"):
        crop(digit, 28, clutter="tidy")
