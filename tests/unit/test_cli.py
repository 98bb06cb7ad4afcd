import numpy as np
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
