"""Training ingest with loader processes: the same batches, in the same order, for any number of
them and whether an epoch is read or drawn from memory, and a resumed stream continues at the same
sample."""

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


def spec_of(urls, tmp_path, loaders, cache_mb=1024):
    return load_spec(TrainSpec, None, [f"data={urls[0]}", f"storage_path={tmp_path}", "batch_size=5",
                                       f"loader_workers={loaders}", f"loader_cache_mb={cache_mb}"])


@pytest.mark.parametrize("world", [1, 2])
def test_any_number_of_loader_processes_gives_the_same_batches_and_resume_continues_exactly(shards, tmp_path, world):
    urls, counts = shards
    steps = 45  # past the third epoch's end (18 steps, or 6 or 12 a rank)
    reference, reasons = drawn(spec_of(urls, tmp_path, 0, cache_mb=0), urls, counts, 0, world, 0, 0, steps)
    assert len({e for e, _, _ in reference}) >= 3 and reasons["corrupt_splats"] and reasons["empty_caption"]
    flat = [t for e, _, batch in reference if e == 0 for t in batch]
    assert len(set(flat)) == len(flat) >= 30  # no sample twice within an epoch
    for k in (0, 1, 3):  # read every epoch, or drawn from memory once read: the same batches and skip counts
        for cache_mb in (0, 1024):
            assert drawn(spec_of(urls, tmp_path, k, cache_mb), urls, counts, 0, world, 0, 0, steps) == (reference, reasons)
    # a run restored at (epoch 0, batch 4) with another number of loader processes sees the same tail
    resumed, _ = drawn(spec_of(urls, tmp_path, 2), urls, counts, 0, world, 0, 4, steps - 4)
    assert resumed == reference[4:]
    # the loaders run on into the next epoch: that epoch is the one a run starting there sees
    later = [b for b in reference if b[0] == 1]
    assert drawn(spec_of(urls, tmp_path, 0), urls, counts, 0, world, 1, 0, len(later))[0] == later


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_whose_shards_are_held_is_drawn_without_reading_or_decoding_a_sample(shards, tmp_path, monkeypatch,
                                                                                      world):
    urls, counts = shards
    checked = []  # the key of every sample decoded
    check = ingest.check_sample
    monkeypatch.setattr(ingest, "check_sample", lambda raw, *a: checked.append(raw["__key__"]) or check(raw, *a))
    per_epoch = [ingest.steps_per_epoch(ShardSet(tuple(urls), counts=counts), WorkerShare(0, world), e, 5)
                 for e in range(8)]
    steps = sum(per_epoch)

    def decoded_by_epoch(cache_mb):
        checked.clear()
        data = Ingest(spec_of(urls, tmp_path, 0, cache_mb), ShardSet(tuple(urls), counts=counts),
                      SampleFormat(encoder="splat", image_size=32), WorkerShare(0, world), number_tokens)
        batches = data.batches((0, 0), Skipped())
        seen = {}
        for _ in range(steps):
            before = len(checked)
            e, _, batch = next(batches)
            seen[e] = seen.get(e, 0) + len(checked) - before
        return seen

    read_always = decoded_by_epoch(0)
    assert all(read_always[e] > 0 for e in range(1, 8))  # every epoch decodes its shards again
    held = decoded_by_epoch(1024)
    # one rank holds all 3 shards after its first epoch; one of 2 after the epochs that gave it each shard.
    # The epoch where that happens still decodes a little before its first batch: the last epoch's tail,
    # and its own first sample, which tells the stream that the last epoch is whole.
    first_whole = 1 if world == 1 else next(e for e in range(8) if {u for x in range(e) for u in
                                                                    ingest.worker_shards(urls, WorkerShare(0, 2), x)}
                                            == set(urls))
    assert first_whole < 7 and all(held[e] == 0 for e in range(first_whole + 1, 8))
    # samples of 0.1 MiB each outgrow the budget of 1 MiB: nothing is held, every epoch is read
    monkeypatch.setattr(ingest, "nbytes", lambda sample: 100_000)
    assert decoded_by_epoch(1) == read_always


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
