import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from splatclip import splats
from splatclip.cli import main


def test_fit_then_render(tmp_path, capsys):
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg", quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    code = main(["fit", str(tmp_path / "astronaut.png"), str(tmp_path / "broken.jpg"), str(tmp_path / "coffee.jpg"),
                 "--gaussians", "64", "--iterations", "20", "--size", "32", "--no-compile", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # one image failed, the others still ran
    errors = [line for line in captured.err.splitlines() if line.startswith("splatclip fit:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert " dB " in captured.out and "2 fitted, 1 failed" in captured.out
    arr, meta = splats.load(out / "coffee.splats.npy")
    assert arr.shape == (64, 8) and meta["height"] == meta["width"] == 32 and meta["source"].endswith("coffee.jpg")

    assert main(["render", str(out / "coffee.splats.npy"), "-o", str(tmp_path / "big.png"), "--size", "80"]) == 0
    assert Image.open(tmp_path / "big.png").size == (80, 80)
    assert main(["render", str(out / "coffee.splats.npy"), "-o", str(tmp_path / "cmp.png"),
                 "--compare", str(tmp_path / "coffee.jpg")]) == 0
    cmp = np.asarray(Image.open(tmp_path / "cmp.png"))
    assert cmp.shape == (32, 3 * 32 + 2 * 4, 3)


def test_a_padded_fit_is_compared_with_the_padded_original(tmp_path):
    from splatclip.fitting.images import crop

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[6:14, 2:8] = wide[6:14, 32:38] = 255  # ink at both ends, which a center crop drops
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert main(["fit", str(tmp_path / "wide.png"), "--gaussians", "16", "--iterations", "5", "--size", "32",
                 "--frame", "pad", "--no-compile", "-o", str(tmp_path / "out")]) == 0
    _, meta = splats.load(tmp_path / "out" / "wide.splats.npy")
    assert meta["frame"] == "pad"
    assert main(["render", str(tmp_path / "out" / "wide.splats.npy"), "-o", str(tmp_path / "cmp.png"),
                 "--compare", str(tmp_path / "wide.png")]) == 0
    original = np.asarray(Image.open(tmp_path / "cmp.png"))[:, :32]  # original | render | error
    assert np.abs(original.astype(int) - crop(wide, 32, "pad")).max() <= 1 and original[:, :4].max() > 100


def test_render_rejects_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "x.splats.npy"
    bad.write_bytes(b"garbage")
    assert main(["render", str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert "x.splats.npy" in capsys.readouterr().err


def test_fit_to_a_signal_target_and_a_bad_one(tmp_path, capsys):
    digit = np.zeros((28, 28), np.uint8)
    digit[10:16, 12:15] = 255  # a small stroke on black: most of the frame is ground the first grid fits
    Image.fromarray(digit).save(tmp_path / "stroke.png")
    signal = 10 * np.log10(((digit / 255.0) ** 2).mean())  # dB of its mean square
    runs = {}
    for name, targets in (("psnr", ["--target-psnr", "20"]), ("both", ["--target-psnr", "20", "--target-snr", "15"])):
        out = tmp_path / name
        assert main(["fit", str(tmp_path / "stroke.png"), "--gaussians", "16", "--iterations", "200", "--size", "28",
                     *targets, "--no-compile", "-o", str(out)]) == 0
        runs[name] = splats.load(out / "stroke.splats.npy")[1]
    assert runs["psnr"]["psnr"] + signal < 15 <= runs["both"]["psnr"] + signal + 0.2, runs  # the SNR it reached
    assert runs["psnr"]["iterations"] < runs["both"]["iterations"] < 200, runs
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "stroke.png"), "--target-snr", "-3", "-o", str(tmp_path / "bad")]) == 2
    assert "target_snr" in capsys.readouterr().err


def test_fit_on_the_ink_through_a_prefilter_and_a_bad_one(tmp_path, capsys):
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a one-bit bar: edges no few Gaussians draw
    Image.fromarray(digit).save(tmp_path / "bar.png")
    fits = {}
    for name, extra in (("plain", []), ("filtered", ["--prefilter", "0.04"])):
        assert main(["fit", str(tmp_path / "bar.png"), "--gaussians", "16", "--iterations", "60", "--size", "28",
                     "--init", "ink", *extra, "--no-compile", "-o", str(tmp_path / name)]) == 0
        fits[name] = splats.load(tmp_path / name / "bar.splats.npy")
    negative = {name: -np.minimum(arr[:, 5:8].astype(np.float64), 0).sum() for name, (arr, _) in fits.items()}
    assert negative["filtered"] < negative["plain"], negative  # less ringing for the edges
    assert fits["filtered"][1]["psnr"] < fits["plain"][1]["psnr"]  # and the PSNR against the bar itself
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "bar.png"), "--prefilter", "-1", "-o", str(tmp_path / "bad")]) == 2
    assert "prefilter" in capsys.readouterr().err


class Service:
    """A stand-in for the serve application on loopback: GET answers `recipe` (status, JSON), POST
    answers one class and keeps the splat files it was sent."""

    def __init__(self, status: int, recipe: dict):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        service = self
        self.status, self.recipe, self.posted = status, recipe, []

        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, answer: dict) -> None:
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply(service.status, service.recipe)

            def do_POST(self):
                service.posted.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.reply(200, {"embedding": [1.0], "gaussians": 0, "classes": [{"name": "seven", "score": 0.9}]})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/embed"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def digit_file(tmp_path):
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a one
    Image.fromarray(digit).save(tmp_path / "one.png")
    return str(tmp_path / "one.png")


RECIPE = {"gaussians": 16, "size": 28, "iterations": 6, "init": "ink", "prefilter": 0.02, "coarse": 0,
          "lr_position": 0.12, "frame": "pad", "some_future_setting": 1}


def test_send_fits_as_the_service_says_its_encoder_was_trained(digit_file, capsys):
    service = Service(200, {"fit": RECIPE, "max_gaussians": 100, "classes": ["seven"]})
    try:
        assert main(["send", digit_file, "--url", service.url, "--no-compile"]) == 0
        out = capsys.readouterr().out
        assert "fitting 16 Gaussians at 28x28 (padded square), init ink, prefilter 0.02, 6 iterations: as the " \
               "encoder's training splats were fitted" in out and "seven 0.900" in out
        (sent,) = service.posted
        assert splats.from_bytes(sent).shape == (16, 8)
        # an option given replaces the service's setting, the rest stay the service's
        assert main(["send", digit_file, "--url", service.url, "--no-compile", "--gaussians", "9"]) == 0
        out = capsys.readouterr().out
        assert "fitting 9 Gaussians at 28x28 (padded square), init ink, prefilter 0.02" in out
        assert "gaussians as given" in out
        assert splats.from_bytes(service.posted[-1]).shape == (9, 8)
    finally:
        service.close()


def send_as_told_and_kept(image: Path, recipe: dict, option: str, monkeypatch, capsys,
                          value: str = "keep") -> list[tuple]:
    """`send IMAGE` to a service whose encoder was fitted with `recipe`, then with `--OPTION VALUE`:
    [(the images fitted [1, 3, 28, 28], the first line printed)] for each."""
    from splatclip.fitting import fitter

    seen, fit_batch = [], fitter.fit_batch
    monkeypatch.setattr(fitter, "fit_batch", lambda images, cfg, *a, **k: seen.append(images) or fit_batch(images, cfg,
                                                                                                       *a, **k))
    service = Service(200, {"fit": {**RECIPE, **recipe}})
    lines = []
    try:
        for extra in ([], [f"--{option}", value]):
            assert main(["send", str(image), "--url", service.url, "--no-compile", *extra]) == 0
            lines.append(capsys.readouterr().out.splitlines()[0])
    finally:
        service.close()
    return list(zip(seen, lines))


def test_send_lifts_a_digit_off_paper_when_the_encoder_was_trained_so(digit_file, tmp_path, capsys, monkeypatch):
    import torch

    Image.fromarray(230 - np.asarray(Image.open(digit_file)) * 0.8).convert("L").save(tmp_path / "paper.png")
    (lifted, told), (kept, given) = send_as_told_and_kept(tmp_path / "paper.png", {"ground": "black"}, "ground",
                                                          monkeypatch, capsys)
    assert "(padded square, ground to black)" in told and "(padded square), init ink" in given
    one = torch.from_numpy(np.asarray(Image.open(digit_file)) > 0)
    assert lifted[0, 0][~one].max() == 0 and lifted[0, 0][one].min() > 0.7
    assert kept[0, 0][~one].min() > 0.85 and kept[0, 0][one].max() < 0.2


def test_send_cuts_a_page_to_its_ink_when_the_encoder_was_trained_so(tmp_path, capsys, monkeypatch):
    page = np.zeros((112, 112), np.uint8)
    page[20:52, 60:68] = 255  # a one, 32 px tall, written small on a page four times a digit's frame
    Image.fromarray(page).save(tmp_path / "page.png")
    (cut, told), (whole, given) = send_as_told_and_kept(tmp_path / "page.png", {"frame": "ink"}, "frame",
                                                        monkeypatch, capsys, value="pad")
    assert "(square around the ink), init ink" in told and "(padded square), init ink" in given
    tall = [int((image[0, 0] > 0.5).any(1).sum()) for image in (cut, whole)]  # the one's height at 28 px
    assert tall[0] >= 16 and tall[1] <= 9, tall  # 32 px of 54 (the ink 0.6 of it), against 32 of 112


def test_send_and_fit_thin_a_heavy_pen_when_the_encoder_was_trained_so(tmp_path, capsys, monkeypatch):
    from splatclip.fitting.images import load_file

    marker = np.zeros((28, 28), np.uint8)
    marker[4:24, 10:17] = 255  # a one drawn with a marker: a stroke 7 px wide (MNIST's pens: 2-3.6)
    Image.fromarray(marker).save(tmp_path / "marker.png")
    (thinned, told), (kept, given) = send_as_told_and_kept(tmp_path / "marker.png", {"ground": "black", "stroke": "thin"},
                                                           "stroke", monkeypatch, capsys)
    assert "(padded square, ground to black, heavy pens thinned)" in told
    assert "(padded square, ground to black), init ink" in given
    thinned, kept = thinned[0, 0] > 0.5, kept[0, 0] > 0.5  # [28, 28] each
    assert kept.sum() == 140 and 40 < thinned.sum() < 100 and not (thinned & ~kept).any()
    # splatclip fit thins it alike, and records the setting beside the splats (render --compare reads it)
    assert main(["fit", str(tmp_path / "marker.png"), "-o", str(tmp_path / "out"), "--gaussians", "9", "--size", "28",
                 "--iterations", "2", "--no-compile", "--ground", "black", "--stroke", "thin"]) == 0
    assert json.loads((tmp_path / "out" / "marker.json").read_text())["stroke"] == "thin"
    image, _ = load_file(str(tmp_path / "marker.png"), 28, ground="black", stroke="thin")  # [3, 28, 28]
    assert ((image[0] > 0.5) == thinned).all()


def test_send_and_fit_drop_clutter_when_the_encoder_was_trained_so(digit_file, tmp_path, capsys, monkeypatch):
    import torch

    from splatclip.fitting.images import load_file

    digit = np.asarray(Image.open(digit_file)).copy()
    one = torch.from_numpy(digit > 0)
    digit[5:20, 0:3] = 255  # a neighbour's stroke, cut by the left edge
    Image.fromarray(digit).save(tmp_path / "cut.png")
    (cleared, told), (kept, given) = send_as_told_and_kept(tmp_path / "cut.png", {"ground": "black", "clutter": "drop"},
                                                           "clutter", monkeypatch, capsys)
    assert "(padded square, ground to black, clutter dropped)" in told
    assert "(padded square, ground to black), init ink" in given
    assert cleared[0, 0][~one].max() == 0 and kept[0, 0][5:20, 0:3].min() == 1
    assert main(["fit", str(tmp_path / "cut.png"), "-o", str(tmp_path / "out"), "--gaussians", "9", "--size", "28",
                 "--iterations", "2", "--no-compile", "--ground", "black", "--clutter", "drop"]) == 0
    assert json.loads((tmp_path / "out" / "cut.json").read_text())["clutter"] == "drop"
    image, _ = load_file(str(tmp_path / "cut.png"), 28, ground="black", clutter="drop")  # [3, 28, 28]
    assert (image[0] == cleared[0, 0]).all()


def test_send_fits_its_images_in_batches_and_names_one_that_fails(digit_file, tmp_path, capsys, monkeypatch):
    from splatclip.fitting import fitter

    sizes, fit_batch = [], fitter.fit_batch
    monkeypatch.setattr(fitter, "fit_batch", lambda images, cfg: sizes.append(len(images)) or fit_batch(images, cfg))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    files = [digit_file, str(tmp_path / "broken.png"), *(str(tmp_path / f"copy{i}.png") for i in range(4))]
    for name in files[2:]:
        Path(name).write_bytes(Path(digit_file).read_bytes())
    service = Service(200, {"fit": RECIPE})
    try:
        assert main(["send", *files, "--url", service.url, "--no-compile", "--batch-size", "2"]) == 1
    finally:
        service.close()
    captured = capsys.readouterr()
    assert sizes == [2, 2, 1] and len(service.posted) == 5  # five images in three optimizer runs
    assert "broken.png" in captured.err and sum(ln.startswith("copy") for ln in captured.out.splitlines()) == 4


@pytest.mark.parametrize("status, answer, words", [
    (405, {"error": "GET: POST the bytes of a splat file"}, "names no fit settings (HTTP 405)"),  # an older service
    (200, {"fit": None, "classes": []}, "names no fit settings (HTTP 200)"),  # a model trained on unrecorded splats
    (200, {"fit": {"gaussians": -3}}, "not this version's"),
    (200, ["not", "an", "object"], "names no fit settings (HTTP 200)"),  # another server at the URL
], ids=["no-get", "no-recipe", "bad-recipe", "not-an-object"])
def test_send_falls_back_to_a_quick_fit_where_the_service_names_none(digit_file, capsys, status, answer, words):
    service = Service(status, answer)
    try:
        assert main(["send", digit_file, "--url", service.url, "--no-compile", "--iterations", "3"]) == 0
        out = capsys.readouterr().out
        assert "fitting 49 Gaussians at 28x28, init structured, prefilter 0, 3 iterations: a quick fit" in out
        assert words in out
        assert splats.from_bytes(service.posted[0]).shape == (49, 8)
    finally:
        service.close()


def test_send_stops_before_fitting_without_the_service_or_with_a_bad_option(digit_file, capsys):
    service = Service(401, {"error": "missing or wrong bearer token"})
    try:
        assert main(["send", digit_file, "--url", service.url]) == 1
        assert "HTTP 401: missing or wrong bearer token" in capsys.readouterr().err
        service.status, service.recipe = 200, {"fit": RECIPE}
        assert main(["send", digit_file, "--url", service.url, "--prefilter", "0.9"]) == 2
        assert "prefilter" in capsys.readouterr().err
    finally:
        service.close()
    assert main(["send", digit_file, "--url", service.url, "--timeout", "5"]) == 1  # nothing listens there now
    assert service.url in capsys.readouterr().err and not service.posted
