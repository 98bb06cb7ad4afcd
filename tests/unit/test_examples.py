"""Example data from installed packages behind `examples://`: written once on first use."""

import io
import json

import pytest
from PIL import Image

from splatclip import datasets
from splatclip.models.backbone import create, model_name
from splatclip.models.zeroshot import load_classes, load_templates
from splatclip.platform import storage
from splatclip.platform.shards import read_samples


def listed(pattern: str) -> tuple[list[str], list[str]]:
    """The shards an `examples://` pattern names, as a job lists its inputs."""
    return storage.list_shards(datasets.resolve_example(pattern))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATCLIP_EXAMPLES", str(tmp_path / "examples"))
    return tmp_path / "examples"


def test_other_urls_pass_through_and_unknown_sets_are_named():
    assert datasets.resolve_example("s3://b/x-{0..1}.tar") == "s3://b/x-{0..1}.tar"
    with pytest.raises(ValueError, match="unknown example set 'cats' \\(known: digits, photos\\)"):
        datasets.resolve_example("examples://cats/*.tar")


def test_photos_are_written_once_and_listed_like_any_shards(cache):
    found, missing = listed("examples://photos/photos-{00000..00001}.tar")
    assert found == [str(cache / "photos" / "photos-00000.tar")]
    assert missing == [str(cache / "photos" / "photos-00001.tar")]
    keys = [s["__key__"] for s in read_samples(found[0])]
    assert keys == datasets.PHOTOS
    stamp = (cache / "photos" / "photos-00000.tar").stat().st_mtime_ns
    assert listed("examples://photos/*.tar")[0] == found
    assert (cache / "photos" / "photos-00000.tar").stat().st_mtime_ns == stamp  # not written again


def test_an_interrupted_set_is_written_again_whole(cache):
    (cache / "photos").mkdir(parents=True)
    (cache / "photos" / "photos-00000.tar").write_bytes(b"half a tar")  # no completion marker
    found, _ = listed("examples://photos/*.tar")
    assert len(list(read_samples(found[0]))) == len(datasets.PHOTOS)


def test_digits_set_has_both_splits_and_their_metadata(cache):
    train, _ = listed("examples://digits/train-*.tar")
    test, _ = listed("examples://digits/test-*.tar")
    assert len(train) == 8 and len(test) == 2
    samples = list(read_samples(test[1]))
    assert len(samples) == 500 and {"png", "txt", "cls", "json"} <= set(samples[0])
    assert json.loads((cache / "digits" / "classes.json").read_text()) == load_classes("digits")
    prompts = [t("seven") for t in load_templates("digits")]
    assert prompts == [t.format(c="seven") for t in datasets.DIGIT_TEMPLATES]


def test_packaged_model_configs_are_known_by_name():
    assert model_name("demo-vit") == "demo-vit"
    model, _ = create("demo-vit")
    assert model.visual.image_size in (28, (28, 28))
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-vit'"):
        model_name("no-such-vit")


def test_varied_digits_are_the_same_digits_drawn_again_each_way_in_turn():
    import numpy as np

    def ink(sample) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(sample["png"])), np.float64)

    full = datasets.digits("train", limit=8, skip=10)
    varied = datasets.digits("train", limit=8, skip=10, varied=True)
    views = list(datasets.RENDITIONS)
    assert [json.loads(s["json"])["view"] for s in varied] == views + views
    assert [s["__key__"] for s in varied] == [f"mnist-{v}-{s['__key__'][5:]}" for v, s in zip(views * 2, full)]
    assert [s["cls"] for s in full] == [s["cls"] for s in varied]
    assert full[0]["__key__"] == datasets.digits("train", limit=11)[10]["__key__"]  # skip leaves out the first 10
    assert "view" not in json.loads(full[0]["json"])
    assert varied[0]["png"] == datasets.digits("train", limit=8, skip=10, varied=True)[0]["png"]  # same arguments, same digits
    for plain, other in zip(full, varied):
        a, b = ink(plain), ink(other)
        view = json.loads(other["json"])["view"]
        if view == "small":  # the same ink in a smaller box: less of it
            assert 0.15 * a.sum() < b.sum() < 0.8 * a.sum()
        elif view == "heavy":
            assert b.sum() > 1.2 * a.sum() and (b >= a - 8).all()  # more ink, none taken (to rounding)
        elif view == "sharp":
            assert set(np.unique(b)) <= {0.0, 255.0} and abs(b.sum() - a.sum()) < 0.5 * a.sum()
    # a solid 20x20 digit box stays solid and framed; a one-pixel stroke becomes a wider, fainter one
    solid = np.zeros((28, 28), np.uint8)
    solid[4:24, 4:24] = 255
    assert (datasets.coarsen(solid) == solid).all()
    stroke = np.zeros((28, 28), np.uint8)
    stroke[4:24, 14] = 255
    low = datasets.coarsen(stroke)  # the 8x8 view
    assert low[:4].max() == 0 and low[24:].max() == 0 and low[:, :4].max() == 0
    assert (low > 0).sum() > 2 * (stroke > 0).sum() and low.max() < 255


def test_conventions_add_a_flag_and_foot_to_a_one_and_a_bar_across_a_sevens_stem():
    import numpy as np

    one = np.zeros((28, 28), np.uint8)
    one[5:23, 13:15] = 255  # an upright stem, x 13-14, y 5-22
    feet = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out = datasets.flagged_one(one, rng)
        added = (out.astype(int) - one) > 64  # [28, 28]
        assert (out >= one).all()  # ink is only added
        ys, xs = np.nonzero(added)
        flag, foot = ys < 14, ys >= 20  # from the stem's top, across its bottom
        assert (flag | foot).all() and flag.any() and xs[flag].min() < 12, seed  # the flag reaches left
        assert xs[flag].min() >= 13 - 0.5 * 18 - 2 and xs[flag].max() <= 15  # at most half the stem long
        feet += bool(foot.any() and (xs[foot] > 15).any())  # a foot reaches across to the right
    assert 4 <= feet <= 16  # about half of them
    seven = np.zeros((28, 28), np.uint8)
    seven[5:7, 8:21] = 255  # the top bar
    for y in range(7, 24):  # the stem: down and to the left from the bar's right end
        x = round(20 - (y - 7) * 8 / 16)
        seven[y, x - 1 : x + 1] = 255
    for seed in range(10):
        out = datasets.crossed_seven(seven, np.random.default_rng(seed))
        ys, xs = np.nonzero((out.astype(int) - seven) > 64)
        assert (out >= seven).all() and ys.size
        assert 12 <= ys.min() and ys.max() <= 18  # a little below the middle of the ink's height
        stem = 20 - (ys.mean() - 7) * 8 / 16
        assert xs.min() < stem - 1.5 and xs.max() > stem + 0.5  # across the stem, both sides


def test_half_of_the_varied_ones_and_sevens_are_written_by_a_convention():
    varied = datasets.digits("train", limit=2000, skip=2000, varied=True)  # the demo's
    records = [json.loads(s["json"]) for s in varied]
    for label in datasets.CONVENTIONS:
        mine = [r for r, s in zip(records, varied) if int(s["cls"]) == label]
        written = sum(r.get("convention") == label for r in mine)
        assert len(mine) > 150 and 0.4 * len(mine) <= written <= 0.6 * len(mine)
    assert not [r for r, s in zip(records, varied) if "convention" in r and int(s["cls"]) not in datasets.CONVENTIONS]
