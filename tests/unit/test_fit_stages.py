"""The fit job's CPU stages on tiny shards: metadata cleaned with a note per repair, one row per
sample (a bad one carries its reason), a shard that cannot be read recorded, decoding bounded."""

import io
import json

import numpy as np
from PIL import Image

from splatclip.fit.stages import clean_metadata, decode_batch, read_shard
from splatclip.pipelines import layout
from splatclip.platform.loader import load_spec
from splatclip.platform.shards import write_shard
from splatclip.platform.specs import FitSpec, ShardLimits


def png(color=(200, 30, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def spec_for(tmp_path, *overrides):
    return load_spec(FitSpec, None, [f"input={tmp_path}/src.tar", f"output={tmp_path}/out", *overrides])


def test_metadata_is_cleaned_and_each_repair_noted():
    sample = {"__key__": "k", "txt": b"caf\xe9", "cls": b"not a class", "json": b'{"a": NaN}'}
    out, notes = clean_metadata(sample, ShardLimits())
    assert out == {"txt": "caf\ufffd".encode(), "cls": b"", "source": b""}
    assert [(n["member"], n["reason"]) for n in notes] == [("txt", "bad_text"), ("cls", "bad_class"),
                                                           ("json", "bad_metadata")]
    deep = {"__key__": "k", "txt": b"ok", "cls": b" 7\n", "json": ("[" * 40 + "]" * 40).encode()}
    out, notes = clean_metadata(deep, ShardLimits())
    assert out["txt"] == b"ok" and out["cls"] == b"7" and [n["reason"] for n in notes] == ["bad_metadata"]
    big = {"__key__": "k", "txt": b"x" * 100}
    out, notes = clean_metadata(big, ShardLimits(max_metadata_bytes=64))
    assert out["txt"] == b"" and notes[0]["reason"] == "metadata_too_large"


def test_a_shard_becomes_one_row_per_sample_and_a_bad_one_says_why(tmp_path):
    with write_shard(str(tmp_path / "src.tar")) as w:
        w.write({"__key__": "a", "png": png(), "txt": b"red", "json": b'{"w": 24}'})
        w.write({"__key__": "b", "txt": b"no image here"})
        w.write({"__key__": "c", "png": png((0, 0, 255)), "txt": b"blue", "cls": b"3"})
    rows = read_shard({"shard": str(tmp_path / "src.tar")}, spec_for(tmp_path))
    assert [(r["index"], r["key"], r["total"], r["error"]) for r in rows] == [(0, "a", 3, ""), (1, "b", 3, "no_image"),
                                                                             (2, "c", 3, "")]
    assert json.loads(rows[0]["source"]) == {"w": 24} and rows[2]["cls"] == b"3" and rows[1]["image"] == b""


def test_an_unreadable_shard_is_recorded_and_yields_no_row(tmp_path):
    (tmp_path / "src.tar").write_bytes(b"\x00garbage" * 100)
    spec = spec_for(tmp_path)
    assert read_shard({"shard": str(tmp_path / "src.tar")}, spec) == []
    record = json.loads((tmp_path / "out" / "_stats" / "src.json").read_text())
    assert record["status"] == "unreadable" and record["errors"][0]["reason"] == "unreadable_shard"
    assert not (tmp_path / "out" / layout.shard_name("src.tar")).exists()


def test_an_empty_shard_is_committed_empty(tmp_path):
    with write_shard(str(tmp_path / "src.tar")):
        pass
    assert read_shard({"shard": str(tmp_path / "src.tar")}, spec_for(tmp_path)) == []
    assert (tmp_path / "out" / "src.tar").exists()
    assert json.loads((tmp_path / "out" / "_stats" / "src.json").read_text())["status"] == "empty"


def test_decoding_crops_good_images_and_records_bad_ones():
    batch = {"key": ["a", "b", "c"], "image": [png(size=(40, 20)), b"\x89PNG not really", png()],
             "error": ["", "", "no_image"], "detail": ["", "", "members: []"]}
    out = decode_batch(batch, 16, ShardLimits())
    assert out["pixels"].shape == (3, 16, 16, 3) and "image" not in out
    assert out["pixels"][0].mean(axis=(0, 1)).round().tolist() == [200, 30, 30]
    assert list(out["error"]) == ["", "undecodable", "no_image"] and out["src_w"][0] == 40 and out["src_h"][0] == 20
    assert out["src_bytes"].tolist() == [len(b) for b in batch["image"]] and not out["pixels"][1].any()
    assert np.asarray(out["src_w"][1:]).tolist() == [0, 0]


def test_decoding_with_frame_pad_keeps_a_wide_image_whole_on_its_ground():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[8:12, 1:4] = wide[8:12, 36:39] = 255  # ink at both ends, which a center crop drops
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    batch = {"key": ["a"], "image": [buf.getvalue()], "error": [""], "detail": [""]}
    cropped, padded = (decode_batch(dict(batch), 20, ShardLimits(), frame=frame)["pixels"][0] for frame in ("crop", "pad"))
    assert cropped.max() == 0  # the crop kept only the empty middle
    assert padded[:, :3].max() > 100 and padded[:, -3:].max() > 100 and padded[:5].max() == 0  # ends kept, black pad


def test_decoding_with_ground_black_lifts_dark_ink_off_a_light_page():
    digit = np.zeros((20, 20, 3), np.uint8)
    digit[3:17, 8:12] = 255
    buf = io.BytesIO()
    Image.fromarray(225 - (digit * 0.7).astype(np.uint8)).save(buf, format="PNG")  # gray paper, ink at 0.7
    batch = {"key": ["a"], "image": [buf.getvalue()], "error": [""], "detail": [""]}
    kept, black = (decode_batch(dict(batch), 20, ShardLimits(), ground=ground)["pixels"][0] for ground in ("keep", "black"))
    assert kept[0, 0, 0] == 225 and kept[10, 10, 0] < 50  # the page as it is
    assert black[digit == 0].max() == 0 and black[digit == 255].min() > 170  # light ink on black
    # a stroke 4 px wide in 20 (a fifth of the side; MNIST's pens are a tenth): thinned as well
    thin = decode_batch(dict(batch), 20, ShardLimits(), ground="black", stroke="thin")["pixels"][0]
    assert thin.max() > 170 and (thin > 85).sum() < 0.75 * (black > 85).sum() and (thin[digit == 0] == 0).all()
