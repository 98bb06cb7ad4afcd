"""Links planted in a fit job's output (another user's, on a shared filesystem): the job refuses each
place it would write through one, names it, and changes nothing outside its output; the storage
layer refuses links below a root at every write, rename and removal."""

import logging
import os

import pytest

from splatclip.fit.actor import FitActor
from splatclip.fit.job import run
from splatclip.fit.stages import decode_batch, read_shard
from splatclip.platform import storage
from splatclip.platform.loader import load_spec
from splatclip.platform.shards import write_shard
from splatclip.platform.specs import FitSpec
from test_fit_actor import columns
from test_fit_stages import png


def snapshot(directory) -> dict:
    """Every path under a directory with its bytes (a link as its target)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[path] = os.readlink(path) if os.path.islink(path) else (None if os.path.isdir(path) else
                                                                          open(path, "rb").read())
    return out


@pytest.fixture
def world(tmp_path):
    """A source shard, an output folder, and a folder outside it with a file in it."""
    with write_shard(str(tmp_path / "src.tar")) as w:
        for i, color in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
            w.write({"__key__": f"k{i}", "png": png(color), "txt": b"a caption"})
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.json").write_text('{"keep": true}')
    spec = load_spec(FitSpec, None, [f"input={tmp_path}/src.tar", f"output={tmp_path}/out", "fit.size=16",
                                     "fit.gaussians=4", "fit.iterations=2", "fit.compile=false", "fit.backend=torch",
                                     "batch_size=2", "tracking.enabled=false"])
    return tmp_path, spec


def test_storage_refuses_links_below_a_root_but_not_the_root_itself(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root")  # the root itself may be a link: the user named it
    storage.write_json(str(tmp_path / "root" / "a" / "b.json"), {"x": 1}, root=str(tmp_path / "root"))
    assert (tmp_path / "real" / "a" / "b.json").exists()
    os.symlink(tmp_path / "outside", tmp_path / "real" / "planted")
    for write in (lambda: storage.write_json(str(tmp_path / "root" / "planted" / "c.json"), {}, root=str(tmp_path / "root")),
                  lambda: storage.write_json(str(tmp_path / "root" / "planted" / "d" / "e.json"), {},
                                             root=str(tmp_path / "root")),
                  lambda: storage.remove(str(tmp_path / "root" / "planted"), root=str(tmp_path / "root")),
                  lambda: storage.write_json(str(tmp_path / "outside" / "f.json"), {}, root=str(tmp_path / "root"))):
        with pytest.raises(storage.LinkError):
            write()
    assert os.listdir(tmp_path / "outside") == []
    os.symlink(tmp_path / "outside" / "g.json", tmp_path / "real" / "g.json")  # a dangling link at a file's name
    with pytest.raises(storage.LinkError, match="g.json is a symbolic link"):
        storage.write_json(str(tmp_path / "root" / "g.json"), {}, root=str(tmp_path / "root"))
    assert os.listdir(tmp_path / "outside") == [] and os.path.islink(tmp_path / "real" / "g.json")


PLACES = {  # where the job writes -> what is planted there (a link to the folder outside, or to a file in it)
    "_parts": "dir", "_parts/src": "dir", "_stats": "dir", "_stats/src.json": "file", "src.tar": "file",
    "_fit.json": "file", "_summary.json": "file", "_SUCCESS.json": "file", "_mlflow_run.json": "file",
    "_parts/src/00000000-00000001.json": "file",
}


@pytest.mark.parametrize("place", list(PLACES))
def test_a_link_where_the_job_writes_stops_it_before_any_fitting(world, place, caplog):
    tmp_path, spec = world
    out = tmp_path / "out"
    (out / place).parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "elsewhere" if PLACES[place] == "dir" else tmp_path / "elsewhere" / "precious.json"
    os.symlink(target, out / place)
    before = snapshot(tmp_path / "elsewhere")
    with caplog.at_level(logging.ERROR):
        assert run(spec) == 2
    assert [r for r in caplog.records if f"{out / place} is a symbolic link" in r.getMessage()]
    assert snapshot(tmp_path / "elsewhere") == before
    assert not (out / "src.tar").exists() or (out / "src.tar").is_symlink()


def test_links_planted_between_the_stages_are_refused_and_recorded(world, caplog):
    """After the job's check: the actor's part, then the commit, each refused; nothing outside changes
    and the parts written before stay."""
    tmp_path, spec = world
    out = tmp_path / "out"
    before = snapshot(tmp_path / "elsewhere")
    actor = FitActor(spec)
    rows = read_shard({"shard": str(tmp_path / "src.tar")}, spec)
    (out / "_parts").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "_parts" / "src")
    got = actor(decode_batch(columns(rows[:2]), spec.fit.size, spec.limits))
    assert "is a symbolic link" in got["refused"][0] and got["fitted"].tolist() == [0]
    os.unlink(out / "_parts" / "src")
    assert actor(decode_batch(columns(rows[:2]), spec.fit.size, spec.limits))["refused"].tolist() == [""]
    os.symlink(tmp_path / "elsewhere", out / "_stats")  # the commit writes the shard's record there
    got = actor(decode_batch(columns(rows[2:]), spec.fit.size, spec.limits))
    assert "_stats is a symbolic link" in got["refused"][0] and not got["committed"][0]
    assert snapshot(tmp_path / "elsewhere") == before
    assert sorted(p.name for p in (out / "_parts" / "src").iterdir()) == [
        "00000000-00000001.claim", "00000000-00000001.json", "00000000-00000001.tar", "00000002-00000002.claim",
        "00000002-00000002.json", "00000002-00000002.tar"]
    assert not (out / "src.tar").exists()
