"""The shifted digit sets: what each transform does to the ink, and that a set is reproducible."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from splatclip import shifted
from splatclip.datasets import digits


def pixels(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["png"])), np.float64)


def test_each_shift_grows_with_its_severity_and_keeps_the_labels():
    plain = digits("test", limit=20)
    ink = sum(pixels(s).sum() for s in plain)
    for kind in set(shifted.SEVERITY) - {"paper", "noisy", "page"}:  # one transform each (combined, paper, noisy,
        # page: below)
        sets = [shifted.shifted_digits(kind, severity, limit=20) for severity in (1, 2, 3)]
        for samples in sets:
            assert [s["cls"] for s in samples] == [s["cls"] for s in plain]
            assert json.loads(samples[0]["json"])["shift"] == kind
        change = [np.mean([np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(plain, s)]) for s in sets]
        assert 0 < change[0] < change[1] < change[2], (kind, change)
    thick, thin, heavy = (sum(pixels(s).sum() for s in shifted.shifted_digits(k, 2, limit=20))
                          for k in ("thicker", "thinner", "heavy"))
    assert thick > 1.3 * ink and thin < 0.8 * ink and heavy > 1.6 * thick
    for severity in (1, 2, 3):  # clutter adds ink beside the digit's, which stays as it was
        assert all((pixels(c) >= pixels(p)).all() for c, p in zip(shifted.shifted_digits("cluttered", severity, limit=20),
                                                                  plain))
    noise = []  # noisy: the digit on black or dark on white paper (0.8 of the contrast), plus noise growing in sd
    for severity in (1, 2, 3):
        samples = shifted.shifted_digits("noisy", severity, limit=20)
        clean = [pixels(p) if np.median(pixels(s)) < 128 else 255 - 0.8 * pixels(p) for s, p in zip(samples, plain)]
        assert 4 <= sum(np.median(pixels(s)) >= 128 for s in samples) <= 16  # about half on paper
        noise.append(np.mean([np.sqrt(((pixels(s) - c) ** 2).mean()) for s, c in zip(samples, clean)]))
    assert 3 < noise[0] < noise[1] < noise[2] < 28, noise  # clipped at black and white: under the sd
    bent = sum(pixels(s).sum() for s in shifted.shifted_digits("bent", 3, limit=20))
    assert 0.85 * ink < bent < 1.15 * ink  # the shape moves, the ink stays
    for severity, box in zip((1, 2, 3), shifted.SEVERITY["filled"]):  # the ink's box as long as the severity, centered
        for s in shifted.shifted_digits("filled", severity, limit=10):
            ys, xs = np.nonzero(pixels(s) > 16)
            assert abs(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 - box) <= 1
            assert abs((ys.max() + ys.min()) / 2 - 13.5) <= 1 and abs((xs.max() + xs.min()) / 2 - 13.5) <= 1
    for severity, sides in zip((1, 2, 3), shifted.SEVERITY["page"]):  # the digit scanned at twice its size, on
        # a black page `sides` times the scan's, anywhere on it
        scan = 28 * shifted.PAGE_SCAN
        places = set()
        for s, p in zip(shifted.shifted_digits("page", severity, limit=10), plain):
            page = pixels(s)
            ys, xs = np.nonzero(page > 16)
            assert page.shape == (sides * scan,) * 2 and s["cls"] == p["cls"]
            assert max(np.ptp(ys), np.ptp(xs)) + 1 > 1.6 * max(np.ptp(v) + 1 for v in np.nonzero(pixels(p) > 16))
            assert abs(page.sum() - shifted.PAGE_SCAN**2 * pixels(p).sum()) < 0.05 * page.sum()  # the ink, scaled
            places.add((ys.min() // scan, xs.min() // scan))
        assert len(places) > 1
    assert shifted.shifted_digits("rotated", 2, limit=5) == shifted.shifted_digits("rotated", 2, limit=5)
    with pytest.raises(ValueError, match="no shifted set"):
        shifted.shifted_digits("sheared", 1)


def test_combined_moves_and_shrinks_the_ink_more_at_each_severity_and_changes_its_pen():
    plain = digits("test", limit=40)

    def extent(image):  # the ink's center and its spread (root mean square distance from the center)
        ys, xs = np.nonzero(image > 0)
        w = image[ys, xs]
        c = np.array([np.average(ys, weights=w), np.average(xs, weights=w)])
        return c, np.sqrt(np.average((ys - c[0]) ** 2 + (xs - c[1]) ** 2, weights=w))

    for severity in (1, 2, 3):
        combined = shifted.shifted_digits("combined", severity, limit=40)
        assert [s["cls"] for s in combined] == [s["cls"] for s in plain]
        assert {json.loads(s["json"])["shift"] for s in combined} == {"combined"}
        shift, zoom = shifted.SEVERITY["shifted"][severity - 1], shifted.SEVERITY["smaller"][severity - 1]
        moved, scale, ink = [], [], []
        for a, b in zip(plain, combined):
            (ca, sa), (cb, sb) = extent(pixels(a)), extent(pixels(b))
            moved.append(np.linalg.norm(cb - ca))
            scale.append(sb / sa)
            ink.append(pixels(b).sum() / pixels(a).sum() / zoom**2)
        # moved by the shift after a rotation about the frame's center (where MNIST centers the ink's
        # mass), zoomed (a heavier or lighter pen first spreads or narrows the ink a little)
        assert abs(np.median(moved) - shift) < 1.0, (severity, moved)
        assert abs(np.median(scale) - zoom) < 0.12, (severity, scale)
        assert min(ink) < 0.85 and max(ink) > 1.15, (severity, ink)  # both pens, lighter and heavier


def test_paper_and_dim_grounds_are_lifted_to_black_less_exactly_at_each_severity():
    from splatclip.fitting.images import to_black_ground

    plain = digits("test", limit=20)
    lifted = []  # how far the page brought back to ink on black is from the digit, at each severity
    for severity in (1, 2, 3):
        pages = shifted.shifted_digits("paper", severity, limit=20)
        assert [s["cls"] for s in pages] == [s["cls"] for s in plain]
        for a, b in zip(plain, pages):
            page = pixels(b)
            assert np.median(page) > 160 and page[pixels(a) > 200].mean() < np.median(page) - 60  # dark ink, light page
        lifted.append(np.mean([np.abs(to_black_ground(np.repeat(pixels(b)[..., None].astype(np.uint8), 3, -1))[..., 0]
                                      - pixels(a)).mean() for a, b in zip(plain, pages)]))
    assert lifted[0] == 0 and lifted[0] < lifted[1] < lifted[2], lifted  # black on white is MNIST inverted
    for severity, (ground, peak, noise) in zip((1, 2, 3), shifted.SEVERITY["dim"]):  # light ink on a gray ground
        for a, b in zip(plain, shifted.shifted_digits("dim", severity, limit=20)):
            page, lifted = pixels(b), to_black_ground(np.repeat(pixels(b)[..., None].astype(np.uint8), 3, -1))[..., 0]
            assert abs(np.median(page) - ground) <= 4 and page.max() <= peak + 5 * noise
            assert np.median(lifted) == 0 and lifted[pixels(a) > 200].mean() > 80  # the ground black, the ink light


def test_printed_digits_cover_the_classes_in_mnist_framing():
    samples = shifted.printed_digits(40)
    assert sorted({int(s["cls"]) for s in samples}) == list(range(10))
    assert samples == shifted.printed_digits(40)
    fonts = {json.loads(s["json"])["source"] for s in samples}
    assert len(fonts) > 10  # many typefaces, not one
    for s in samples:
        image = pixels(s)
        assert image.shape == (28, 28) and image.max() > 200
        ys, xs = np.nonzero(image > 16)
        assert ys.max() - ys.min() <= 23 and xs.max() - xs.min() <= 23  # a 14-22 pixel box, slanted
        cy, cx = (np.average(c, weights=image[ys, xs]) for c in (ys, xs))
        assert abs(cy - 13.5) <= 3.5 and abs(cx - 13.5) <= 3.5  # centered by its ink, moved up to 2 pixels
