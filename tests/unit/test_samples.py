"""Training/evaluation samples: bad ones are skipped and counted, never a crash."""

import numpy as np

from splatclip import splats
from splatclip.pipelines.samples import Skipped, collate, stream
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
    got = list(stream([url], 0, 1, 0, 0, "splat", 32, None, skipped, need_text=True, classes=10))
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
    seen = [[s["text"] for s in stream(urls, r, 2, 0, 0, "splat", 32, None, Skipped())] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 2 and sorted(seen[0] + seen[1]) == ["t0", "t1", "t2", "t3"]
