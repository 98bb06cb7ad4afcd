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


def test_a_pattern_of_billions_of_names_is_refused_before_any_name_is_made(monkeypatch):
    import braceexpand

    from splatclip.platform import storage

    made, expand = [], braceexpand.braceexpand

    def counting(pattern, escape=True):
        for name in expand(pattern, escape):
            made.append(name)
            yield name

    monkeypatch.setattr(storage.braceexpand, "braceexpand", counting, raising=True)
    for pattern in ("s3://b/{00000000000..99999999999}.tar", "/nowhere/{0..999}{0..999}{0..9}.tar",
                    "/n/{a,{0..999}{0..999}{0..9}}.tar", "/n/{0..99}{0..99}{0..99}{{0..9},x}.tar"):
        with pytest.raises(ValueError, match="more than 1000000"):
            storage.list_shards(pattern)
    assert made == []  # sized from the grammar: not one name was expanded
    assert len(storage.expand_braces("/n/{0..99}{0..99}{0..99}.tar")) == 1_000_000 and len(made) == 1_000_000


PATTERNS = ["a", "{a,b}", "{1..3}", "x{07..10}y", "{a..g..2}", "{4..1}", "{2..-1}", "python{2.{5..7},3.{2,3}}",
            "{1\\{2,3}", "{}", "{a}", "a{,b}c", "{{a,b},{c,{d,e}}}", "}{", "{1..10..3}", "{10..1..3}", "{Z..a}",
            "{0..0}", "{,}", "{a,b}{1..3}{x,{y,z}}", "{1..3..0}", "{-3..-1}", "{a\\,b,c}"]


def test_pattern_size_is_the_number_of_names_braceexpand_makes():
    import random

    import braceexpand

    from splatclip.platform.storage import pattern_size

    rng = random.Random(0)
    patterns = PATTERNS + ["".join(rng.choice("{},.a1\\") for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    for p in patterns:
        try:
            want = len(list(braceexpand.braceexpand(p)))
        except braceexpand.UnbalancedBracesError:
            with pytest.raises(ValueError):
                pattern_size(p)
            continue
        assert pattern_size(p) == want, p
    with pytest.raises(ValueError, match="nested"):
        pattern_size("{" * 40 + "a,b" + "}" * 40)


def test_a_shard_of_too_many_samples_is_cut_and_says_so(tmp_path):
    from splatclip.platform.specs import ShardLimits

    url = str(tmp_path / "many.tar")
    with write_shard(url) as w:
        for i in range(30):
            w.write({"__key__": f"k{i:03d}", "txt": b"x"})
    got = list(read_samples(url, limits=ShardLimits(max_shard_samples=10)))
    assert [s["__key__"] for s in got[:10]] == [f"k{i:03d}" for i in range(10)]
    assert len(got) == 11 and got[10]["__problems__"][0][1] == "shard_too_large"
