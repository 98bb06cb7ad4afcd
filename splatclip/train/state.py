"""What a training run keeps to continue where it stopped: its position, every rank's random
generators, and the batches that killed a worker.

A checkpoint is one directory that Ray Train merges from the reports of all ranks:
- `state.pt` (rank 0): the trainable weights, the position (`TrainState`), and the optimizer and
  scheduler of the stage in progress;
- `rng-RANK.pt` (each rank): that rank's Python, NumPy, torch CPU and CUDA generator states.
All of it loads with `torch.load(weights_only=True)`: tensors, numbers and strings, no pickle.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splatclip.platform import storage
from splatclip.platform.specs import TrainSpec

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    stage: int = 0  # index in `spec.stages` of the stage in progress
    stage_step: int = 0  # optimizer steps done in that stage
    step: int = 0  # optimizer steps done in all stages (MLflow's step axis)
    epoch: int = 0  # the data position: the epoch of the next batch to draw ...
    batch: int = 0  # ... and its index in that epoch
    run_id: str | None = None  # the MLflow run rank 0 logs to

    def next_stage(self) -> "TrainState":
        """The position a finished stage resumes at: the start of the next one."""
        return dataclasses.replace(self, stage=self.stage + 1, stage_step=0)


def run_dir(spec: TrainSpec) -> str:
    return storage.join(spec.storage_path, spec.name)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's generator states, CUDA's for `device` when it is a GPU."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def write_checkpoint(directory: Path, rank: int, device: torch.device, state: TrainState | None = None,
                     weights: dict | None = None, optimizer: dict | None = None, scheduler: dict | None = None) -> None:
    """This rank's files of a checkpoint: its generators, and on rank 0 (`state` given) the rest."""
    torch.save(rng_state(device), directory / f"rng-{rank}.pt")
    if state is not None:
        payload = {"weights": weights, "position": dataclasses.asdict(state)}
        if optimizer is not None:
            payload.update(optimizer=optimizer, scheduler=scheduler)
        torch.save(payload, directory / "state.pt")


def read_checkpoint(directory: Path, rank: int, device: torch.device) -> dict:
    """Rank 0's payload (weights, position, optimizer, scheduler), with this rank's generators set;
    a rank the checkpoint has no file for (the run now has more workers) takes rank 0's."""
    payload = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    own = directory / f"rng-{rank}.pt"
    set_rng_state(torch.load(own if own.exists() else directory / "rng-0.pt", weights_only=True), device)
    payload["position"] = TrainState(**payload["position"])
    return payload


def poisoned_batches(spec: TrainSpec) -> frozenset:
    """The (epoch, batch) positions whose step raised in an earlier attempt of this run."""
    found = set()
    for name in storage.listdir(storage.join(run_dir(spec), "_poisoned"), spec.storage):
        parts = name.removesuffix(".json").split("-")
        if len(parts) == 2 and parts[0][1:].isdigit() and parts[1][1:].isdigit():
            found.add((int(parts[0][1:]), int(parts[1][1:])))
    return frozenset(found)


def record_poisoned(spec: TrainSpec, position: dict, rank: int, err: BaseException) -> None:
    """Record the batch a step failed on, so that the restarted workers pass over it: a sample that
    kills a worker is never replayed by every restart until `max_failures` runs out."""
    epoch, index = position["epoch"], position["index"]
    url = storage.join(run_dir(spec), "_poisoned", f"e{epoch}-b{index}.json")
    log.error("rank %d failed on epoch %d batch %d (%s: %s); restarted workers will pass over it", rank, epoch, index,
              type(err).__name__, str(err)[:300])
    try:
        storage.write_json(url, {"rank": rank, "error": f"{type(err).__name__}: {err}"[:1000]}, spec.storage)
    except Exception as write_err:  # the original error matters more
        log.error("could not record the failed batch: %s", write_err)
