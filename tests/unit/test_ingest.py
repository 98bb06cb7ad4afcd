"""Training ingest with loader processes: the same batches, in the same order, for any number of
them, and a resumed stream continues at the same sample."""

import pytest
import torch

from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, WorkerShare
from splatclip.train import ingest
from splatclip.train.ingest import Ingest
from splatclip.platform.shards import write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import TrainSpec
from test_samples import good_splats


def number_tokens(texts):
    """A stand-in tokenizer: the caption's number as its one token."""
    return torch.tensor([[int(t.split()[-1])] for t in texts])  # [b, 1]


@pytest.fixture
def shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "CHUNK", 16)  # chunks end inside shards, and batches span chunks
    urls, counts = [], {}
    for s in range(3):
        url = str(tmp_path / f"s{s}.tar")
        with write_shard(url) as w:
            for i in range(37):
                n = 1000 * s + i
                sample = {"__key__": f"k{n}", "splats.npy": good_splats(), "txt": f"caption {n}".encode()}
                if i % 11 == 3:
                    sample["splats.npy"] = b"not an array"  # skipped: corrupt_splats
                if i % 13 == 5:
                    sample["txt"] = b""  # skipped: empty_caption
                w.write(sample)
        urls.append(url)
        counts[url] = sum(1 for i in range(37) if i % 11 != 3 and i % 13 != 5)  # the 30 valid ones
    return urls, counts


def drawn(spec, urls, counts, rank, world, epoch, skip, steps):
    skipped = Skipped()
    shards = ShardSet(tuple(urls), counts=counts)
    fmt = SampleFormat(encoder="splat", image_size=32)
    rank_data = Ingest(spec, shards, fmt, WorkerShare(rank, world, spec.seed), number_tokens)
    data = rank_data.batches((epoch, skip), skipped)
    got = []
    for _ in range(steps):
        e, i, batch = next(data)
        assert batch["params"].shape[0] == spec.batch_size
        got.append((e, i, batch["tokens"][:, 0].tolist()))
    return got, dict(skipped.reasons)


@pytest.mark.parametrize("world", [1, 2])
def test_any_number_of_loader_processes_gives_the_same_batches_and_resume_continues_exactly(shards, tmp_path, world):
    urls, counts = shards
    spec = lambda k: load_spec(TrainSpec, None, [f"data={urls[0]}", f"storage_path={tmp_path}",  # noqa: E731
                                                 "batch_size=5", f"loader_workers={k}"])
    steps = 30  # past the first epoch's end (18 steps, or 6 or 12 a rank)
    reference, reasons = drawn(spec(0), urls, counts, 0, world, 0, 0, steps)
    assert len({e for e, _, _ in reference}) >= 2 and reasons["corrupt_splats"] and reasons["empty_caption"]
    flat = [t for e, _, batch in reference if e == 0 for t in batch]
    assert len(set(flat)) == len(flat) >= 30  # no sample twice within an epoch
    for k in (1, 3):  # (the skip counts differ: loaders read ahead, and count what they decode)
        assert drawn(spec(k), urls, counts, 0, world, 0, 0, steps)[0] == reference
    # a run restored at (epoch 0, batch 4) with another number of loader processes sees the same tail
    resumed, _ = drawn(spec(2), urls, counts, 0, world, 0, 4, steps - 4)
    assert resumed == reference[4:]
    # the loaders run on into the next epoch: that epoch is the one a run starting there sees
    later = [b for b in reference if b[0] == 1]
    assert drawn(spec(0), urls, counts, 0, world, 1, 0, len(later))[0] == later


def test_an_epoch_with_fewer_samples_than_counted_takes_another_pass_over_its_own_order(shards, tmp_path):
    urls, counts = shards
    overstated = {u: c + 10 for u, c in counts.items()}  # 30 samples that never come
    spec = load_spec(TrainSpec, None, [f"data={urls[0]}", f"storage_path={tmp_path}", "batch_size=5",
                                       "loader_workers=2"])
    got, _ = drawn(spec, urls, overstated, 0, 1, 0, 0, 27)
    first = [t for e, _, batch in got if e == 0 for t in batch]
    assert len(first) == 120 and first[90:] == first[:30]  # 90 valid, then the same order again
    assert [b[1] for b in got if b[0] == 1] == [0, 1, 2]
    assert got[24:] == drawn(spec, urls, overstated, 0, 1, 1, 0, 3)[0]
