"""The tiled CPU renderer's three pair kernels (`splatclip.cuda.pairs`: binning's test of candidate
pairs, the pairs' colors, their gradient) compiled ahead of time for this machine with AOTInductor:
built once, then loaded by every process in milliseconds.

torch.compile traces and looks its kernels up again in every process (about 5 s before the first step
with a warm cache, 20-35 s with a cold one); for `splatclip fit` on a few photos, or a fitting actor
that starts on a fresh node, that was a large part of the wall time. Here each kernel is exported
once with a dynamic number of pairs, tiles and Gaussians and compiled to a shared library in a package under
`$SPLATCLIP_KERNELS` (default ~/.cache/splatclip/kernels), in a folder named for torch's version, the
CPU's vector capability and the kernels' source (this file's too), so a change to any of them builds anew. The first
process that needs them builds them under a file lock (the fitting actors of one node build once) and
moves the folder into place whole; `python -m splatclip.cuda.aot` builds them ahead (set-up, a
cluster node's set-up commands). Where they cannot be built or loaded the renderer runs the same math
eagerly, with one warning.
"""

import fcntl
import functools
import hashlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from splatclip.cuda import pairs
from splatclip.cuda.contract import CUTOFF

log = logging.getLogger(__name__)
NAMES = ("pair_keys", "tile_colors", "pair_backward")
MIN_ROWS = 2  # export treats sizes 0 and 1 as constants: fewer pairs, tiles or Gaussians run eagerly


class _Keys(torch.nn.Module):
    def forward(self, p, gaussian, start, tx0, ty0, span, grid):
        return pairs.pair_keys(p, gaussian, start, tx0, ty0, span, grid)


class _Colors(torch.nn.Module):
    def forward(self, zeros, cols, key, geom):
        return pairs.tile_colors(zeros, cols, key, geom)


class _Backward(torch.nn.Module):
    def forward(self, cols, key, grad_tiles, geom):
        return pairs.pair_backward(cols, key, grad_tiles, geom)


def kernels_root() -> Path:
    return Path(os.environ.get("SPLATCLIP_KERNELS") or Path.home() / ".cache" / "splatclip" / "kernels").absolute()


def package_dir() -> Path:
    """Where this torch, CPU and kernel source (the math, and how it is exported) keep their packages."""
    text = "\n".join([torch.__version__, torch.backends.cpu.get_cpu_capability(), repr(CUTOFF),
                      inspect.getsource(pairs), Path(__file__).read_text()])
    return kernels_root() / f"cpu-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _export(name: str):
    """Kernel `name` exported at example inputs (2 images of 4 x 3 tiles, 5 Gaussians each), its sizes
    dynamic."""
    tiles_x, tiles, B, P, N = 3, 12, 2, 40, 5
    n_gaussians, n_candidates, n_pairs, n_tiles = (torch.export.Dim(size, min=MIN_ROWS)
                                                   for size in ("gaussians", "candidates", "pairs", "tiles"))
    if name == "pair_keys":
        count = torch.randint(1, 4, (B * N,))  # [M] candidates per Gaussian
        # every input its own tensor: export takes one passed twice, or two views of one, to be one input
        args = (torch.rand(B * N, 8), torch.repeat_interleave(torch.arange(B * N), count),  # p [M, 8], gaussian [P0]
                torch.cumsum(count, 0) - count, torch.randint(0, 2, (B * N,)), torch.randint(0, 2, (B * N,)), count,
                torch.tensor([pairs.TILE, tiles_x * pairs.TILE, 4 * pairs.TILE, tiles_x, tiles, N]))
        shapes = ({0: n_gaussians}, {0: n_candidates}, *[{0: n_gaussians}] * 4, None)
        return torch.export.export(_Keys(), args, dynamic_shapes=shapes)
    cols = torch.rand(8, P) + 0.1  # [8, P]
    key = torch.randint(0, B * tiles, (P,))  # [P]
    geom = torch.tensor([tiles_x, tiles, 4 * pairs.TILE, tiles_x * pairs.TILE])
    if name == "tile_colors":
        args = (torch.zeros(B * tiles, 3 * pairs.TILE ** 2), cols, key, geom)
        return torch.export.export(_Colors(), args, dynamic_shapes=({0: n_tiles}, {1: n_pairs}, {0: n_pairs}, None))
    grad_tiles = torch.rand(B * tiles, 3, pairs.TILE * pairs.TILE)  # [B * tiles, 3, TILE^2]
    return torch.export.export(_Backward(), (cols, key, grad_tiles, geom),
                               dynamic_shapes=({1: n_pairs}, {0: n_pairs}, {0: n_tiles}, None))


def build(directory: Path) -> None:
    """Export and compile the kernels into `directory` (about 45 s on 2 cores; one process per kernel
    was no faster)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        torch._inductor.aoti_compile_and_package(_export(name), package_path=str(directory / f"{name}.pt2"))


class Kernels(NamedTuple):
    pair_keys: object  # (p, gaussian, start, tx0, ty0, span, grid) -> keep [P0], key [P0]
    colors: object  # (zeros, cols, key, geom) -> [B * tiles, 3 TILE^2]
    backward: object  # (cols, key, grad_tiles, geom) -> [P, 8]


def _load(directory: Path) -> Kernels:
    return Kernels(*(torch._inductor.aoti_load_package(str(directory / f"{name}.pt2")) for name in NAMES))


def _built(directory: Path) -> bool:
    return all((directory / f"{name}.pt2").is_file() for name in NAMES)


def _build_locked(directory: Path) -> None:
    """Build into a temporary folder beside `directory` and move it into place, one process at a time;
    a folder that is there but did not load (partial, damaged) is replaced."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _built(directory):
            try:
                _load(directory)
                return  # another process built it while this one waited
            except Exception:  # noqa: BLE001 - damaged: rebuilt below
                shutil.rmtree(directory)
        log.warning("compiling the CPU renderer's kernels for this machine into %s: once, about a minute "
                    "(`python -m splatclip.cuda.aot` does it ahead)", directory)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            build(staging)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def load() -> Kernels | None:
    """This machine's compiled kernels, built first where there are none; None (after one warning)
    where they can be neither built nor loaded."""
    directory = package_dir()
    try:
        if _built(directory):
            try:
                return _load(directory)
            except Exception:  # noqa: BLE001 - damaged or partial: rebuilt
                pass
        _build_locked(directory)
        return _load(directory)
    except Exception as err:  # noqa: BLE001 - no compiler, a read-only cache, ...: the eager path still works
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log.warning("the CPU renderer's compiled kernels are unavailable (%s: %s); rendering eagerly",
                    type(err).__name__, first[:300])
        return None


def applies(cols, rows: int) -> bool:
    """Whether the compiled kernels take these inputs: cols [8, P] float32 on the CPU with P and `rows`
    (the other dynamic size: tiles, candidates) at least MIN_ROWS."""
    return cols.device.type == "cpu" and cols.dtype == torch.float32 and min(cols.shape[1], rows) >= MIN_ROWS


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    if load() is None:
        sys.exit(1)
    print(f"compiled CPU kernels ready in {package_dir()}")
