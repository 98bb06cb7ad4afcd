import pytest

from splatclip.platform import storage
from splatclip.platform.shards import read_samples, write_shard


def test_expand_braces_keeps_padding():
    assert storage.expand_braces("s3://b/{00000..00002}.tar") == [
        "s3://b/00000.tar", "s3://b/00001.tar", "s3://b/00002.tar"]
    assert storage.expand_braces("d/{a,b}-{1..2}.tar") == ["d/a-1.tar", "d/a-2.tar", "d/b-1.tar", "d/b-2.tar"]


def test_list_shards_splits_found_and_missing(tmp_path):
    for i in (0, 2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"x")
    found, missing = storage.list_shards(str(tmp_path / "{00000..00002}.tar"))
    assert found == [str(tmp_path / "00000.tar"), str(tmp_path / "00002.tar")]
    assert missing == [str(tmp_path / "00001.tar")]
    found, _ = storage.list_shards(f"file://{tmp_path}/*.tar")
    assert found == [f"file://{tmp_path}/00000.tar", f"file://{tmp_path}/00002.tar"]


def test_atomic_write_local_all_or_nothing(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    storage.write_bytes(str(target), b"first")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(str(target)) as f:
            f.write(b"half of the second version")
            raise RuntimeError("killed midway")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]  # no temporary left behind


def test_success_marker(tmp_path):
    assert storage.read_success(str(tmp_path)) is None
    storage.mark_success(str(tmp_path), {"shards": 3})
    assert storage.read_success(str(tmp_path)) == {"shards": 3}


def test_shard_roundtrip_and_unsafe_member(tmp_path):
    url = str(tmp_path / "s.tar")
    with write_shard(url) as w:
        w.write({"__key__": "a", "txt": b"hello", "json": b"{}"})
        w.write({"__key__": "../escape", "txt": b"bad"})
        w.write({"__key__": "b", "txt": b"world"})
    samples = list(read_samples(url))
    assert [s["__key__"] for s in samples] == ["a", "../escape", "b"]
    assert samples[0]["txt"] == b"hello" and samples[2]["txt"] == b"world"
    assert samples[1]["__problems__"] == [("", "unsafe_path", "path outside the archive")] and "txt" not in samples[1]


def test_a_pattern_of_billions_of_names_is_refused_at_once():
    import time

    from splatclip.platform.storage import expand_braces, list_shards

    start = time.perf_counter()
    with pytest.raises(ValueError, match="more than 1000000 names"):
        expand_braces("s3://b/{00000000000..99999999999}.tar")
    with pytest.raises(ValueError, match="more than 1000000 names"):
        list_shards("/nowhere/{0..999}{0..999}{0..9}.tar")
    assert time.perf_counter() - start < 5


def test_a_shard_of_too_many_samples_is_cut_and_says_so(tmp_path):
    from splatclip.platform.specs import ShardLimits

    url = str(tmp_path / "many.tar")
    with write_shard(url) as w:
        for i in range(30):
            w.write({"__key__": f"k{i:03d}", "txt": b"x"})
    got = list(read_samples(url, limits=ShardLimits(max_shard_samples=10)))
    assert [s["__key__"] for s in got[:10]] == [f"k{i:03d}" for i in range(10)]
    assert len(got) == 11 and got[10]["__problems__"][0][1] == "shard_too_large"
