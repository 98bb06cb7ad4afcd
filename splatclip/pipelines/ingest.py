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
import itertools
import os
import signal
import stat
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from splatclip.pipelines.samples import check_sample, collate, raw_pairs, worker_shards
from splatclip.platform.specs import TrainSpec

CHUNK = 64  # raw samples a loader process decodes as one piece (fewer, larger transfers to the trainer)
PREFETCH = 4  # chunks each loader process keeps ready
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def steps_per_epoch(counts: dict[str, int], shards: list[str], world: int, seed: int, epoch: int, batch: int) -> int:
    """Micro-batches every worker can draw in an epoch (the smallest worker's share decides, so all
    workers take the same number of collective steps)."""
    if len(shards) < world:
        return max(1, sum(counts.values()) // world // batch)
    shares = [sum(counts[s] for s in worker_shards(shards, r, world, seed, epoch)) for r in range(world)]
    return max(1, min(shares) // batch)


@dataclass
class Chunk:
    epoch: int
    samples: list = field(default_factory=list)  # the valid ones, decoded, in order
    skipped: list = field(default_factory=list)  # (reason, key) of each one skipped

    def add(self, reason: str, key: str) -> None:  # the `Skipped` interface, recorded for the trainer
        self.skipped.append((reason, key))


class DecodedChunks(IterableDataset):
    """One rank's samples as decoded chunks, epoch after epoch from `epoch` (one pass each; `passes=1`:
    that epoch only). Chunks are numbered across epochs (an epoch's last one may be short); in a
    DataLoader process, only its own are decoded and yielded. Ends after an epoch without samples."""

    def __init__(self, spec: TrainSpec, shards, rank: int, world: int, epoch: int, image_size: int, tokenizer,
                 sources: dict[str, str] | None, source_size: int, embed_dim: int | None, passes: int | None = None):
        self.spec, self.shards, self.rank, self.world, self.epoch = spec, shards, rank, world, epoch
        self.image_size, self.tokenizer, self.embed_dim = image_size, tokenizer, embed_dim
        self.sources, self.source_size, self.passes = sources, source_size, passes

    def __iter__(self):
        info = get_worker_info()
        me, k = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # k processes beside the training step: one core each
        number = 0  # of the next chunk, across epochs
        epochs = itertools.count(self.epoch) if self.passes is None else range(self.epoch, self.epoch + self.passes)
        for epoch in epochs:
            chunk, begun = None, number
            pairs = raw_pairs(self.shards, self.rank, self.world, self.spec.seed, epoch, self.spec.storage,
                              self.sources, self.spec.limits)
            for position, (raw, source) in enumerate(pairs):
                if position % CHUNK == 0:
                    if chunk is not None:
                        yield self._tokenized(chunk)
                    mine, number = (number % k == me), number + 1
                    chunk = Chunk(epoch) if mine else None
                if chunk is not None:
                    self._decode(raw, source, chunk)
            if chunk is not None:
                yield self._tokenized(chunk)
            if number == begun:
                return

    def _decode(self, raw: dict, source: dict | None, chunk: Chunk) -> None:
        spec = self.spec
        s = check_sample(raw, source, spec.model.encoder, self.image_size, chunk, True, None, bool(self.sources),
                         self.source_size, spec.limits, self.embed_dim)
        if s is not None:
            # numpy crosses to the trainer inside the chunk's pickle; a tensor would take a shared
            # memory segment of its own per sample
            chunk.samples.append({k: v.numpy() if torch.is_tensor(v) else v for k, v in s.items()})

    def _tokenized(self, chunk: Chunk) -> Chunk:
        """The chunk with each sample's tokens [context], from one tokenizer call for the chunk."""
        if self.tokenizer is not None and chunk.samples:
            tokens = self.tokenizer([s["text"] for s in chunk.samples]).numpy()  # [n, context]
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


def decoded(dataset: DecodedChunks, loader_workers: int, skipped):
    """(epoch, sample) of the dataset's valid samples in order, decoded by `loader_workers`
    processes (0: this one); the skipped ones counted in `skipped` as their chunks arrive."""
    loader = DataLoader(dataset, batch_size=None, num_workers=loader_workers,
                        prefetch_factor=PREFETCH if loader_workers else None,
                        multiprocessing_context="fork" if loader_workers else None,
                        worker_init_fn=_loader_init if loader_workers else None)
    for chunk in loader:
        for reason, key in chunk.skipped:
            skipped.add(reason, key)
        for sample in chunk.samples:
            yield chunk.epoch, sample


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


def batches(spec: TrainSpec, shards, counts, rank, world, image_size, tokenizer, epoch: int, skip: int, skipped,
            sources: dict[str, str] | None = None, source_size: int = 224, embed_dim: int | None = None,
            poisoned: frozenset = frozenset(), cursor: dict | None = None):
    """Endless (epoch, index, batch) from a data position. The loader processes run from epoch to
    epoch without a restart; an epoch whose samples run out before its batches do (bad samples may
    leave fewer than counted) takes a further pass over its own order. With `sources`, batches carry
    source images. Positions in `poisoned` (batches that raised before) are drawn but never yielded,
    on every rank alike; `cursor` always holds the position being drawn, for the record of a failure."""
    cursor = {} if cursor is None else cursor

    def chunks(first: int, passes: int | None = None):
        return DecodedChunks(spec, shards, rank, world, first, image_size, tokenizer, sources, source_size, embed_dim,
                             passes)

    stream, held = decoded(chunks(epoch), spec.loader_workers, skipped), []
    while True:
        per_epoch = steps_per_epoch(counts, shards, world, spec.seed, epoch, spec.batch_size)
        index, pending, again = 0, [], False
        cursor.update(epoch=epoch, index=index)
        while index < per_epoch:
            drawn = 0
            samples = decoded(chunks(epoch, 1), spec.loader_workers, skipped) if again else of_epoch(stream, epoch, held)
            for item in samples:
                sample = item[1] if again else item
                drawn += 1
                pending.append(sample)
                if len(pending) < spec.batch_size:
                    continue
                if index >= skip and (epoch, index) in poisoned:
                    skipped.add("poisoned_batch", f"epoch {epoch} batch {index}")
                elif index >= skip:
                    yield epoch, index, collate(pending, None, image_size, spec.positives)
                pending, index = [], index + 1
                cursor.update(epoch=epoch, index=index)
                if index >= per_epoch:
                    break
            if not drawn:
                raise RuntimeError(f"worker {rank} found no usable samples in its shards ({dict(skipped.reasons)})")
            again = True
        epoch, skip = epoch + 1, 0


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
