"""Training ingest: loader processes decode, check and tokenize samples ahead of the step.

The order of samples is the one `samples.raw_pairs` defines for a (seed, epoch, rank), whatever the
number of loader processes k: the raw samples are cut into chunks of CHUNK consecutive ones, chunk c
is decoded by loader process c % k, and torch's DataLoader hands the chunks back in order (it takes
item i from process i % k, and every process yields its chunks in order). The training process forms
the batches from the valid samples exactly as a single process would, so a checkpoint's (epoch,
batch) position means the same samples for any k. Each loader process reads every raw sample of the
rank's shards (tar members' bytes: cheap) but decodes and tokenizes only its own chunks.

The loader processes are forks of the trainer (a fork server or spawn would start each one as a new
interpreter: seconds per loader, and twice the step time here). A fork inherits the trainer's open
sockets, Ray's connection to its raylet among them, so each loader first closes every inherited
socket and asks the kernel to kill it when the trainer dies (`_loader_init`): otherwise a killed
trainer would not look dead to Ray while its loaders lived, and its training group would hang.

Once a rank has read an epoch whole, it keeps the decoded samples of that epoch's shards in memory
while they fit in `loader_cache_mb` (`EpochCache`): a later epoch whose shards are all held is drawn
from memory in the order a read would give, with no shard read, decoded or tokenized again, and the
loader processes stop. Skipped samples are counted as the trainer passes them, so the counts are the
same for any number of loader processes and for an epoch drawn from memory.

Why torch's DataLoader and not Ray Data's streaming split: the order above, and with it the exact
resume from (epoch, batch), needs each rank's stream to be a pure function of (seed, epoch, rank);
a streaming split hands blocks to whichever rank asks first.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import signal
import stat
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from splatclip.pipelines.samples import (SampleFormat, ShardSet, WorkerShare, check_sample, collate, raw_pairs,
                                         worker_shards)
from splatclip.platform.specs import TrainSpec

CHUNK = 64  # raw samples a loader process decodes as one piece (fewer, larger transfers to the trainer)
PREFETCH = 4  # chunks each loader process keeps ready
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def steps_per_epoch(shards: ShardSet, share: WorkerShare, epoch: int, batch: int) -> int:
    """Micro-batches every worker can draw in an epoch (the smallest worker's share decides, so all
    workers take the same number of collective steps)."""
    counts = shards.counts
    if len(shards.urls) < share.world:
        return max(1, sum(counts.values()) // share.world // batch)
    ranks = [dataclasses.replace(share, rank=r) for r in range(share.world)]
    return max(1, min(sum(counts[s] for s in worker_shards(shards.urls, r, epoch)) for r in ranks) // batch)


@dataclass
class Chunk:
    epoch: int
    items: list = field(default_factory=list)  # in order: (shard URL, decoded sample, None) or (URL, None, (reason, key))
    url: str = ""  # the shard of the sample being checked

    def add(self, reason: str, key: str) -> None:  # the `Skipped` interface: a skip, counted by the trainer
        self.items.append((self.url, None, (reason, key)))


class Ingest:
    """One rank's training data: its share of the shards, decoded to the sample format, tokenized,
    and batched in the order `samples.raw_pairs` defines."""

    def __init__(self, spec: TrainSpec, shards: ShardSet, fmt: SampleFormat, share: WorkerShare, tokenizer=None):
        self.spec, self.shards, self.fmt, self.share, self.tokenizer = spec, shards, fmt, share, tokenizer

    def decoded(self, epoch: int, passes: int | None = None):
        """(epoch, shard URL, sample, skip) of every raw sample from `epoch` on (`passes` epochs; None:
        endless), in order, decoded by `spec.loader_workers` processes (0: this one): a valid sample
        with skip None, or sample None and skip (reason, key)."""
        workers = self.spec.loader_workers
        loader = DataLoader(DecodedChunks(self, epoch, passes), batch_size=None, num_workers=workers,
                            prefetch_factor=PREFETCH if workers else None,
                            multiprocessing_context="fork" if workers else None,
                            worker_init_fn=_loader_init if workers else None)
        for chunk in loader:
            for url, sample, skip in chunk.items:
                yield chunk.epoch, url, sample, skip

    def batches(self, start: tuple[int, int], skipped, poisoned: frozenset = frozenset(), cursor: dict | None = None):
        """Endless (epoch, index, batch) from the data position `start` (epoch, batch). The loader
        processes run from epoch to epoch without a restart until an epoch can be drawn from memory
        (`EpochCache`); an epoch whose samples run out before its batches do (bad samples may leave
        fewer than counted) takes a further pass over its own order. An epoch's samples past its last
        batch are passed over (their skips counted). Positions in `poisoned` (batches that raised
        before) are drawn but never yielded, on every rank alike; `cursor` always holds the position
        being drawn, for the record of a failure."""
        spec, (epoch, skip) = self.spec, start
        cursor = {} if cursor is None else cursor
        cache = EpochCache(self.shards, self.share, spec.loader_cache_mb << 20)
        stream, held = None, []
        while True:
            per_epoch = steps_per_epoch(self.shards, self.share, epoch, spec.batch_size)
            index, pending, again = 0, [], False
            cursor.update(epoch=epoch, index=index)
            while index < per_epoch:
                drawn = 0
                if cache.holds(epoch):
                    if stream is not None:  # the loader processes stop reading ahead
                        stream.close()
                        stream, held = None, []
                    items = cache.replay(epoch)
                elif again:
                    items = self.decoded(epoch, passes=1)
                else:
                    if stream is None:
                        stream = cache.recorded(self.decoded(epoch))
                    items = of_epoch(stream, epoch, held)
                for _, _, sample, why in items:
                    if sample is None:
                        skipped.add(*why)
                        continue
                    drawn += 1
                    if index >= per_epoch:  # past the epoch's last batch
                        continue
                    pending.append(sample)
                    if len(pending) < spec.batch_size:
                        continue
                    if index >= skip and (epoch, index) in poisoned:
                        skipped.add("poisoned_batch", f"epoch {epoch} batch {index}")
                    elif index >= skip:
                        yield epoch, index, collate(pending, image_size=self.fmt.image_size, positives=spec.positives)
                    pending, index = [], index + 1
                    cursor.update(epoch=epoch, index=index)
                if not drawn:
                    raise RuntimeError(f"worker {self.share.rank} found no usable samples in its shards "
                                       f"({dict(skipped.reasons)})")
                again = True
            epoch, skip = epoch + 1, 0


class EpochCache:
    """The decoded items of the shards a rank has read in whole epochs, kept while they fit in
    `budget` bytes (then none are kept). An epoch is whole when the stream moves past it; every shard
    of its order is then held, an empty or unreadable one with no items. An epoch whose shards are
    all held is replayed in its own shard order. Off with fewer shards than workers (a rank's samples
    then depend on the whole epoch's order) or a shard listed twice."""

    def __init__(self, shards: ShardSet, share: WorkerShare, budget: int):
        self.shards, self.share, self.budget = shards, share, budget
        self.on = budget > 0 and len(set(shards.urls)) == len(shards.urls) >= share.world
        self.held: dict[str, list] = {}  # shard URL -> its items, (sample, skip) in order
        self.reading: dict[str, list] = {}  # the items of the epoch being read
        self.size = 0  # bytes of the held and read samples' arrays

    def holds(self, epoch: int) -> bool:
        return self.on and all(url in self.held for url in worker_shards(self.shards.urls, self.share, epoch))

    def replay(self, epoch: int):
        for url in worker_shards(self.shards.urls, self.share, epoch):
            for sample, skip in self.held[url]:
                yield epoch, url, sample, skip

    def recorded(self, stream):
        """`stream` (epoch, url, sample, skip) as it is, with each whole epoch's shards kept."""
        reading = None  # the epoch being read
        for epoch, url, sample, skip in stream:
            if epoch != reading:
                self._whole(reading)
                reading = epoch
            if self.on:
                self.reading.setdefault(url, []).append((sample, skip))
                self.size += nbytes(sample)
                if self.size > self.budget:
                    self.on, self.held, self.reading, self.size = False, {}, {}, 0
            yield epoch, url, sample, skip
        self._whole(reading)

    def _whole(self, epoch: int | None) -> None:
        if self.on and epoch is not None:
            for url in worker_shards(self.shards.urls, self.share, epoch):
                self.size -= sum(nbytes(sample) for sample, _ in self.held.get(url, ()))
                self.held[url] = self.reading.pop(url, [])
        self.reading = {}


def nbytes(sample: dict | None) -> int:
    """Memory a decoded sample holds: its arrays and its caption (a skip holds none)."""
    if sample is None:
        return 0
    return sum(v.nbytes if hasattr(v, "nbytes") else len(v) if isinstance(v, str) else 8 for v in sample.values())


class DecodedChunks(IterableDataset):
    """One rank's samples as decoded chunks, epoch after epoch from `epoch` (one pass each; `passes=1`:
    that epoch only). Chunks are numbered across epochs (an epoch's last one may be short); in a
    DataLoader process, only its own are decoded and yielded. Ends after an epoch without samples."""

    def __init__(self, ingest: Ingest, epoch: int, passes: int | None = None):
        self.ingest, self.epoch, self.passes = ingest, epoch, passes

    def __iter__(self):
        info = get_worker_info()
        me, k = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # k processes beside the training step: one core each
        ingest = self.ingest
        number = 0  # of the next chunk, across epochs
        epochs = itertools.count(self.epoch) if self.passes is None else range(self.epoch, self.epoch + self.passes)
        for epoch in epochs:
            chunk, begun = None, number
            for position, (raw, source) in enumerate(raw_pairs(ingest.shards, ingest.share, epoch, ingest.fmt.limits)):
                if position % CHUNK == 0:
                    if chunk is not None:
                        yield self._tokenized(chunk)
                    mine, number = (number % k == me), number + 1
                    chunk = Chunk(epoch) if mine else None
                if chunk is not None:
                    chunk.url = raw["__url__"]
                    s = check_sample(raw, source, ingest.fmt, chunk)
                    if s is not None:
                        # numpy crosses to the trainer inside the chunk's pickle; a tensor would take a
                        # shared memory segment of its own per sample
                        chunk.items.append((chunk.url, {k: v.numpy() if torch.is_tensor(v) else v
                                                        for k, v in s.items()}, None))
            if chunk is not None:
                yield self._tokenized(chunk)
            if number == begun:
                return

    def _tokenized(self, chunk: Chunk) -> Chunk:
        """The chunk with each sample's tokens [context], from one tokenizer call for the chunk."""
        tokenizer = self.ingest.tokenizer
        samples = [s for _, s, _ in chunk.items if s is not None]
        if tokenizer is not None and samples:
            tokens = tokenizer([s["text"] for s in samples]).numpy()  # [n, context]
            for s, row in zip(samples, tokens):
                s["tokens"] = row
        return chunk


def _loader_init(_worker_id: int) -> None:
    """In a forked loader process: die with the trainer, and hold none of its sockets (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:  # the directory's own descriptor, gone by now
            pass


def of_epoch(stream, epoch: int, held: list):
    """The items of `epoch` from a stream of (epoch, ...) items that runs epoch after epoch; items of
    earlier epochs are passed over, and the first of a later one is kept in `held` for the next call."""
    if held:
        item, = held
        if item[0] > epoch:
            return
        held.clear()
        if item[0] == epoch:
            yield item
    for item in stream:
        if item[0] > epoch:
            held.append(item)
            return
        if item[0] == epoch:
            yield item


def on_device(items, device: torch.device):
    """(epoch, index, batch) with the batch's tensors on `device`. On a GPU they are copied from pinned
    memory without blocking, one batch ahead, so the next batch's copy overlaps this step."""
    if device.type != "cuda":
        yield from items
        return
    ahead = None
    for epoch, index, batch in items:
        moved = {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        if ahead is not None:
            yield ahead
        ahead = (epoch, index, moved)
    if ahead is not None:
        yield ahead
