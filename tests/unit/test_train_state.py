"""What a training checkpoint holds besides weights: generator states that load without pickle."""

import io
import random

import numpy as np
import torch

from splatclip.train.state import rng_state, set_rng_state


def test_rng_state_round_trips_through_a_weights_only_load():
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    buf = io.BytesIO()
    torch.save({"rng": rng_state()}, buf)
    want = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


def test_a_batch_that_raised_is_passed_over_by_every_rank(tmp_path):
    """A failing step records its position; the restarted workers draw that batch and skip it."""
    from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, WorkerShare
    from splatclip.train.ingest import Ingest
    from splatclip.train.state import poisoned_batches, record_poisoned
    from splatclip.platform.shards import write_shard
    from splatclip.platform.loader import load_spec
    from splatclip.platform.specs import TrainSpec
    from test_samples import good_splats

    url = str(tmp_path / "s.tar")
    with write_shard(url) as w:
        for i in range(8):
            w.write({"__key__": f"k{i}", "splats.npy": good_splats(), "txt": f"caption {i}".encode()})
    spec = load_spec(TrainSpec, None, [f"data={url}", f"storage_path={tmp_path / 'runs'}", "batch_size=2"])
    assert poisoned_batches(spec) == frozenset()
    record_poisoned(spec, {"epoch": 0, "index": 1}, 0, RuntimeError("this batch killed the worker"))
    poisoned = poisoned_batches(spec)
    assert poisoned == {(0, 1)}
    skipped = Skipped()
    ingest = Ingest(spec, ShardSet((url,), counts={url: 8}), SampleFormat(image_size=32), WorkerShare())
    data = ingest.batches((0, 0), skipped, poisoned)
    got = [next(data)[:2] for _ in range(4)]
    assert got == [(0, 0), (0, 2), (0, 3), (1, 0)] and skipped.reasons["poisoned_batch"] == 1


def test_fetched_weights_are_cached_privately_by_url_and_endpoint(tmp_path, monkeypatch):
    import os
    import stat

    from splatclip.models import backbone
    from splatclip.platform.specs import StorageSpec

    monkeypatch.setattr(backbone.tempfile, "gettempdir", lambda: str(tmp_path))
    fetched = []
    monkeypatch.setattr(backbone.storage, "read_bytes", lambda url, spec: fetched.append((url, spec.endpoint_url))
                        or f"{url} at {spec.endpoint_url}".encode())
    one = backbone.local_weights("s3://b/w.pt", StorageSpec(endpoint_url="http://127.0.0.1:1"))
    two = backbone.local_weights("s3://b/w.pt", StorageSpec(endpoint_url="http://127.0.0.1:2"))
    again = backbone.local_weights("s3://b/w.pt", StorageSpec(endpoint_url="http://127.0.0.1:1"))
    assert one == again != two and len(fetched) == 2
    assert open(two, "rb").read() == b"s3://b/w.pt at http://127.0.0.1:2"
    mode = stat.S_IMODE(os.stat(os.path.dirname(one)).st_mode)
    assert mode == 0o700 and not [p for p in os.listdir(os.path.dirname(one)) if p.endswith(".part")]
