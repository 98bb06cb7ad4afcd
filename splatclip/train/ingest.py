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
    samples: list = field(default_factory=list)  # the valid ones, decoded, in order
    skipped: list = field(default_factory=list)  # (reason, key) of each one skipped

    def add(self, reason: str, key: str) -> None:  # the `Skipped` interface, recorded for the trainer
        self.skipped.append((reason, key))


class Ingest:
    """One rank's training data: its share of the shards, decoded to the sample format, tokenized,
    and batched in the order `samples.raw_pairs` defines."""

    def __init__(self, spec: TrainSpec, shards: ShardSet, fmt: SampleFormat, share: WorkerShare, tokenizer=None):
        self.spec, self.shards, self.fmt, self.share, self.tokenizer = spec, shards, fmt, share, tokenizer

    def decoded(self, epoch: int, skipped, passes: int | None = None):
        """(epoch, sample) of the valid samples from `epoch` on (`passes` epochs; None: endless), in
        order, decoded by `spec.loader_workers` processes (0: this one); the skipped ones counted in
        `skipped` as their chunks arrive."""
        workers = self.spec.loader_workers
        loader = DataLoader(DecodedChunks(self, epoch, passes), batch_size=None, num_workers=workers,
                            prefetch_factor=PREFETCH if workers else None,
                            multiprocessing_context="fork" if workers else None,
                            worker_init_fn=_loader_init if workers else None)
        for chunk in loader:
            for reason, key in chunk.skipped:
                skipped.add(reason, key)
            for sample in chunk.samples:
                yield chunk.epoch, sample

    def batches(self, start: tuple[int, int], skipped, poisoned: frozenset = frozenset(), cursor: dict | None = None):
        """Endless (epoch, index, batch) from the data position `start` (epoch, batch). The loader
        processes run from epoch to epoch without a restart; an epoch whose samples run out before its
        batches do (bad samples may leave fewer than counted) takes a further pass over its own order.
        Positions in `poisoned` (batches that raised before) are drawn but never yielded, on every rank
        alike; `cursor` always holds the position being drawn, for the record of a failure."""
        spec, (epoch, skip) = self.spec, start
        cursor = {} if cursor is None else cursor
        stream, held = self.decoded(epoch, skipped), []
        while True:
            per_epoch = steps_per_epoch(self.shards, self.share, epoch, spec.batch_size)
            index, pending, again = 0, [], False
            cursor.update(epoch=epoch, index=index)
            while index < per_epoch:
                drawn = 0
                samples = self.decoded(epoch, skipped, passes=1) if again else of_epoch(stream, epoch, held)
                for item in samples:
                    sample = item[1] if again else item
                    drawn += 1
                    pending.append(sample)
                    if len(pending) < spec.batch_size:
                        continue
                    if index >= skip and (epoch, index) in poisoned:
                        skipped.add("poisoned_batch", f"epoch {epoch} batch {index}")
                    elif index >= skip:
                        yield epoch, index, collate(pending, image_size=self.fmt.image_size, positives=spec.positives)
                    pending, index = [], index + 1
                    cursor.update(epoch=epoch, index=index)
                    if index >= per_epoch:
                        break
                if not drawn:
                    raise RuntimeError(f"worker {self.share.rank} found no usable samples in its shards "
                                       f"({dict(skipped.reasons)})")
                again = True
            epoch, skip = epoch + 1, 0


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
                    s = check_sample(raw, source, ingest.fmt, chunk)
                    if s is not None:
                        # numpy crosses to the trainer inside the chunk's pickle; a tensor would take a
                        # shared memory segment of its own per sample
                        chunk.samples.append({k: v.numpy() if torch.is_tensor(v) else v for k, v in s.items()})
            if chunk is not None:
                yield self._tokenized(chunk)
            if number == begun:
                return

    def _tokenized(self, chunk: Chunk) -> Chunk:
        """The chunk with each sample's tokens [context], from one tokenizer call for the chunk."""
        tokenizer = self.ingest.tokenizer
        if tokenizer is not None and chunk.samples:
            tokens = tokenizer([s["text"] for s in chunk.samples]).numpy()  # [n, context]
            for s, row in zip(chunk.samples, tokens):
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
    """The samples of `epoch` from a stream of (epoch, sample) that runs epoch after epoch; samples of
    earlier epochs are passed over, and the first of a later one is kept in `held` for the next call."""
    if held:
        (e, sample), = held
        if e > epoch:
            return
        held.clear()
        if e == epoch:
            yield sample
    for e, sample in stream:
        if e > epoch:
            held.append((e, sample))
            return
        if e == epoch:
            yield sample


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
