"""The fitting actor, called as Ray Data calls it (no Ray here): a batch of decoded rows is fitted
in one optimizer step, written as a part, and the shard committed once its parts cover it."""

import json
import os

from splatclip import splats
from splatclip.fit.actor import FitActor
from splatclip.fit.stages import decode_batch, read_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.specs import FitSpec
from test_fit_stages import png


def columns(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_a_batch_is_fitted_written_and_its_shard_committed(tmp_path):
    src = str(tmp_path / "src.tar")
    with write_shard(src) as w:
        w.write({"__key__": "a", "png": png(), "txt": b"red", "cls": b"1"})
        w.write({"__key__": "b", "png": b"\x89PNG broken", "txt": b"broken"})
        w.write({"__key__": "c", "png": png((0, 0, 255)), "txt": b"blue"})
        w.write({"__key__": "d", "png": png((0, 255, 0)), "txt": b"green"})
    spec = load_spec(FitSpec, None, [f"input={src}", f"output={tmp_path}/out", "fit.size=16", "fit.gaussians=4",
                                     "fit.iterations=3", "fit.compile=false", "fit.backend=torch"])
    actor = FitActor(spec)
    rows = read_shard({"shard": src}, spec)
    first = actor(decode_batch(columns(rows[:2]), spec.fit.size, spec.limits))
    assert first["images"].tolist() == [2] and first["fitted"].tolist() == [1] and not first["committed"][0]
    parts = tmp_path / "out" / "_parts" / "src"
    assert sorted(p.name for p in parts.iterdir()) == \
        ["00000000-00000001.claim", "00000000-00000001.json", "00000000-00000001.tar"]
    holder = json.loads((parts / "00000000-00000001.claim").read_text())
    assert set(holder) == {"node", "pid"} and holder["pid"] == os.getpid()  # node: None unless Ray runs here
    assert first["refitted"].tolist() == [False]
    again = actor(decode_batch(columns(rows[:2]), spec.fit.size, spec.limits))  # as Ray resends a lost actor's batch
    assert again["refitted"].tolist() == [True] and again["fitted"].tolist() == [1]
    second = actor(decode_batch(columns(rows[2:]), spec.fit.size, spec.limits))
    assert second["committed"].tolist() == [True]
    assert not list((tmp_path / "out" / "_parts").glob("src/*"))  # the parts are removed once committed
    out = list(read_samples(str(tmp_path / "out" / "src.tar")))
    assert [s["__key__"] for s in out] == ["a", "c", "d"]  # in the source's order, the broken one left out
    arr = splats.from_bytes(out[0]["splats.npy"])
    assert arr.shape == (4, 8) and out[0]["cls"] == b"1" and out[0]["txt"] == b"red"
    meta = json.loads(out[0]["json"])
    assert meta["gaussians"] == 4 and meta["bytes"] == 64 and meta["source_width"] == 24 and meta["psnr"] > 10
    record = json.loads((tmp_path / "out" / "_stats" / "src.json").read_text())
    assert record["fitted"] == 3 and [(e["key"], e["reason"]) for e in record["errors"]] == [("b", "undecodable")]
