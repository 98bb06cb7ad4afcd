"""Training/evaluation samples: bad ones are skipped and counted, never a crash."""

import numpy as np
import torch

from splatclip import datasets, splats
from splatclip.fitting.images import clip_crop, decode
from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, WorkerShare, collate, stream
from splatclip.platform.shards import write_shard


def good_splats(n=5):
    a = np.zeros((n, 8), np.float16)
    a[:, 0:2], a[:, 2], a[:, 4], a[:, 5:8] = 0.5, 0.02, 0.02, 0.3
    return splats.to_bytes(a)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    url = str(tmp_path / "s.tar")
    with write_shard(url) as w:
        w.write({"__key__": "ok1", "splats.npy": good_splats(3), "txt": b"a one", "cls": b"1"})
        w.write({"__key__": "corrupt", "splats.npy": b"\x93NUMPY garbage", "txt": b"x", "cls": b"1"})
        w.write({"__key__": "nocaption", "splats.npy": good_splats(), "txt": b"  ", "cls": b"2"})
        w.write({"__key__": "badclass", "splats.npy": good_splats(), "txt": b"x", "cls": b"17"})
        w.write({"__key__": "ok2", "splats.npy": good_splats(6), "txt": b"a two", "cls": b"2"})
    skipped = Skipped()
    got = list(stream(ShardSet((url,)), SampleFormat(image_size=32, classes=10), skipped))
    assert [s["text"] for s in got] == ["a one", "a two"]
    assert dict(skipped.reasons) == {"corrupt_splats": 1, "empty_caption": 1, "bad_class": 1}
    batch = collate(got)
    assert batch["params"].shape == (2, 6, 8) and batch["mask"].sum(1).tolist() == [3, 6]
    assert batch["labels"].tolist() == [1, 2]


def test_workers_split_the_shards(tmp_path):
    urls = []
    for i in range(4):
        urls.append(str(tmp_path / f"{i}.tar"))
        with write_shard(urls[-1]) as w:
            w.write({"__key__": f"k{i}", "splats.npy": good_splats(), "txt": f"t{i}".encode()})
    seen = [[s["text"] for s in stream(ShardSet(tuple(urls)), SampleFormat(image_size=32), Skipped(), WorkerShare(r, 2))] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 2 and sorted(seen[0] + seen[1]) == ["t0", "t1", "t2", "t3"]


def test_splat_samples_join_their_source_images_by_key(tmp_path):
    """Each splat sample gets the image of the same key from the image shard of the same name, in
    whatever order the image shard holds them; a missing or undecodable source skips the sample."""
    rng = np.random.default_rng(0)
    pictures = {f"k{i}": rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(5)}
    source = str(tmp_path / "src" / "s.tar")
    with write_shard(source) as w:
        for key in ("k3", "k0", "k1", "k4"):  # k2 missing, order shuffled
            w.write({"__key__": key, "png": datasets.encode(pictures[key], "png"), "txt": b"x"})
        w.write({"__key__": "k5", "png": b"not a png", "txt": b"x"})
    fitted = str(tmp_path / "splats" / "s.tar")
    with write_shard(fitted) as w:
        for key in ("k0", "k1", "k2", "k3", "k4", "k5"):
            w.write({"__key__": key, "splats.npy": good_splats(), "txt": key.encode()})
    skipped = Skipped()
    got = list(stream(ShardSet((fitted,), sources={fitted: source}), SampleFormat(image_size=32, source_size=16), skipped))
    assert [s["text"] for s in got] == ["k0", "k1", "k3", "k4"]
    assert dict(skipped.reasons) == {"no_source_image": 1, "bad_source_image": 1}
    for s in got:
        want = clip_crop(decode(datasets.encode(pictures[s["text"]], "png")), 16)
        assert torch.equal(s["image"], want)
    batch = collate(got, None, 32)
    assert batch["images"].shape == (4, 3, 16, 16) and batch["params"].shape == (4, 5, 8)


def test_caption_ids_are_stable_and_tell_copies_apart():
    from splatclip.pipelines.samples import caption_id

    assert caption_id("a photo of a 3.") == caption_id("a photo of a 3.") != caption_id("a photo of a 4.")
    assert caption_id("x") == 2858720872202629029  # the same number in every process and session
    batch = collate([{"splats": np.zeros((1, 8), np.float16), "text": t} for t in ("a", "b", "a")],
                    tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    ids = batch["positive_ids"]
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1]


def test_class_positives_join_the_captions_of_a_class():
    from splatclip.pipelines.layout import class_id

    assert [class_id(b) for b in (b"3", b" 7\n", b"-1", b"x", b"\xff", b"9" * 40, b"")] == [3, 7, None, None, None, None, None]
    samples = [{"splats": np.zeros((1, 8), np.float16), "text": t, "class_id": c}
               for t, c in (("a three", 3), ("the digit 3", 3), ("a four", 4), ("a three", None))]
    tokenize = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731
    by_class = collate(samples, tokenize, positives="class")["positive_ids"]
    assert by_class[0] == by_class[1] != by_class[2]  # other captions, one class
    assert by_class[3] not in (by_class[0], by_class[2])  # no class: its caption, which no class id equals
    by_caption = collate(samples, tokenize)["positive_ids"]
    assert by_caption[0] == by_caption[3] != by_caption[1]


def teacher_bytes(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_samples_that_would_kill_a_worker_are_skipped(tmp_path):
    """Wrong-shape or NaN teacher embeddings, a million Gaussians, values far outside a fit's range:
    each is counted under its reason and never reaches collate or a model."""
    from splatclip.platform.specs import ShardLimits

    url = str(tmp_path / "s.tar")
    huge = np.zeros((1_000_000, 8), np.float16)
    huge[:, 2], huge[:, 4] = 0.01, 0.01
    wild = np.zeros((4, 8), np.float16)
    wild[:, 2], wild[:, 4], wild[:, 0] = 0.01, 0.01, 30000.0
    good_teacher = teacher_bytes(np.full(8, 0.3, np.float16))
    with write_shard(url) as w:
        w.write({"__key__": "ok", "splats.npy": good_splats(), "txt": b"a", "teacher.npy": good_teacher})
        w.write({"__key__": "shape", "splats.npy": good_splats(), "txt": b"a",
                 "teacher.npy": teacher_bytes(np.zeros((2, 4), np.float16))})
        w.write({"__key__": "dim", "splats.npy": good_splats(), "txt": b"a",
                 "teacher.npy": teacher_bytes(np.zeros(5, np.float16))})
        w.write({"__key__": "nan", "splats.npy": good_splats(), "txt": b"a",
                 "teacher.npy": teacher_bytes(np.full(8, np.nan, np.float16))})
        w.write({"__key__": "junk", "splats.npy": good_splats(), "txt": b"a", "teacher.npy": b"\x93NUMPY junk"})
        w.write({"__key__": "million", "splats.npy": splats.to_bytes(huge), "txt": b"a", "teacher.npy": good_teacher})
        w.write({"__key__": "wild", "splats.npy": splats.to_bytes(wild), "txt": b"a", "teacher.npy": good_teacher})
        w.write({"__key__": "ok", "splats.npy": good_splats(), "txt": b"the same key", "teacher.npy": good_teacher})
        w.write({"__key__": "ok2", "splats.npy": good_splats(), "txt": b"b" * 100_000, "teacher.npy": good_teacher})
    skipped = Skipped()
    fmt = SampleFormat(image_size=32, embed_dim=8, limits=ShardLimits(max_gaussians=65_536))
    got = list(stream(ShardSet((url,)), fmt, skipped))
    assert len(got) == 2 and len(got[1]["text"]) == 4096  # a huge caption is cut before tokenizing
    assert dict(skipped.reasons) == {"bad_teacher": 4, "too_many_gaussians": 1, "splats_out_of_range": 1,
                                     "duplicate_key": 1}
    assert collate(got)["teacher"].shape == (2, 8)


def test_an_unreadable_shard_ends_its_stream_without_raising(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    good = str(tmp_path / "good.tar")
    with write_shard(good) as w:
        w.write({"__key__": "ok", "splats.npy": good_splats(), "txt": b"a"})
    skipped = Skipped()
    got = list(stream(ShardSet((str(bad), good)), SampleFormat(image_size=32), skipped))
    assert len(got) == 1


def test_a_lying_sample_count_is_not_believed(tmp_path):
    import json

    from splatclip.pipelines.samples import count_samples

    url = str(tmp_path / "out" / "s.tar")
    with write_shard(url) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "splats.npy": good_splats(), "txt": b"a"})
    (tmp_path / "out" / "_stats").mkdir()
    (tmp_path / "out" / "_stats" / "s.json").write_text(json.dumps({"fitted": 10**12}))
    assert count_samples(ShardSet((url,))) == {url: 3}  # an epoch of 10^12 samples would never end
    (tmp_path / "out" / "_stats" / "s.json").write_text(json.dumps({"fitted": 2}))
    assert count_samples(ShardSet((url,))) == {url: 2}
