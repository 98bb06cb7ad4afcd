"""The distributed commit: a shard appears once its parts cover it, whole, from disjoint parts by
byte concatenation and from overlapping ones (a rerun batched differently) sample by sample."""

import tarfile

from splatclip.fit import parts
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import FitSpec


def rows_and_samples(indices, total, failed=()):
    rows = [{"index": i, "total": total, "key": f"k{i}", "error": "undecodable" if i in failed else "",
             "detail": "", "notes": [], "meta": None if i in failed else {"psnr": 30.0 + i, "bytes": 16,
                                                                            "source_bytes": 100, "raw_bytes": 300,
                                                                            "seconds": 0.1}} for i in indices]
    samples = [{"__key__": f"k{i}", "splats.npy": f"splats {i}".encode(), "txt": f"caption {i}".encode()}
               for i in indices if i not in failed]
    return rows, samples


def test_disjoint_parts_commit_by_concatenation_once_they_cover_the_shard(tmp_path):
    spec = FitSpec(input="src/a.tar", output=str(tmp_path / "out"))
    for indices in ([0, 1, 2], [5, 6]):
        parts.write_part(spec, "src/a.tar", *rows_and_samples(indices, 7, failed={1}))
        assert parts.commit_if_complete(spec, "src/a.tar", 7) is None  # 3 and 4 are missing
    assert parts.covered(spec, "src/a.tar") == {0, 1, 2, 5, 6}
    parts.write_part(spec, "src/a.tar", *rows_and_samples([3, 4], 7))
    stats = parts.commit_if_complete(spec, "src/a.tar", 7)
    assert stats["images"] == 7 and stats["fitted"] == 6 and stats["errors"][0]["key"] == "k1"
    shard = str(tmp_path / "out" / "a.tar")
    assert [s["__key__"] for s in read_samples(shard)] == ["k0", "k2", "k3", "k4", "k5", "k6"]
    with tarfile.open(shard) as tar:  # a plain tar any reader opens
        assert len(tar.getnames()) == 12
    assert not list((tmp_path / "out" / "_parts").rglob("*.*"))


def test_overlapping_parts_are_merged_each_sample_once(tmp_path):
    spec = FitSpec(input="src/b.tar", output=str(tmp_path / "out"))
    parts.write_part(spec, "src/b.tar", *rows_and_samples([0, 1, 2], 4))
    parts.write_part(spec, "src/b.tar", *rows_and_samples([2, 3], 4))  # 2 again, batched otherwise
    assert parts.commit_if_complete(spec, "src/b.tar", 4)["fitted"] == 4
    got = list(read_samples(str(tmp_path / "out" / "b.tar")))
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2", "k3"] and got[2]["txt"] == b"caption 2"


def test_a_commit_removes_the_claims_of_batches_a_killed_job_never_wrote(tmp_path):
    spec = FitSpec(input="src/c.tar", output=str(tmp_path / "out"))
    parts.claim(spec, "src/c.tar", [{"index": 1}], {"node": None, "pid": 1})  # the killed job's batch: 1 only
    rows, samples = rows_and_samples([0, 1, 2], 3)  # the rerun batched 0-2 together
    assert not parts.claim(spec, "src/c.tar", rows, {"node": None, "pid": 2})
    parts.write_part(spec, "src/c.tar", rows, samples)
    assert parts.commit_if_complete(spec, "src/c.tar", 3)["fitted"] == 3
    assert not list((tmp_path / "out" / "_parts" / "c").iterdir())


def test_the_sweep_removes_a_killed_writes_temporary_files_and_a_committed_shards_leftovers(tmp_path):
    """A job killed inside a write leaves `.NAME.UUID.part` (storage.atomic_write's temporary file);
    the next run, holding the output's lease, removes it and keeps the parts it resumes from."""
    spec = FitSpec(input="src/d.tar", output=str(tmp_path / "out"))
    parts.write_part(spec, "src/d.tar", *rows_and_samples([0], 2))
    parts.claim(spec, "src/d.tar", [{"index": 1}], {"node": None, "pid": 1})
    todo, done = tmp_path / "out" / "_parts" / "d", tmp_path / "out" / "_parts" / "e"
    (todo / ".00000001-00000001.claim.0123abcd.part").write_bytes(b'{"node": nu')
    done.mkdir()
    (done / "00000000-00000001.claim").write_text("{}")
    (done / ".00000000-00000001.tar.4567ef.part").write_bytes(b"\0" * 512)
    assert parts.sweep(spec, ["src/d.tar", "src/e.tar", "src/f.tar"], done={"src/e.tar"}) == 3
    assert sorted(p.name for p in todo.iterdir()) == ["00000000-00000000.json", "00000000-00000000.tar",
                                                       "00000001-00000001.claim"]
    assert not list(done.iterdir()) and parts.covered(spec, "src/d.tar") == {0}
