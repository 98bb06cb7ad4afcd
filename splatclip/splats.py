"""The Splats container, its float16 codec and the single-image file format.

On disk a fitted image is `NAME.splats.npy`: a float16 array [n, 8] holding only the live Gaussians
(16 bytes each, nothing else counted), beside `NAME.json` with its metadata (image size, metrics).
Loading never unpickles and checks everything a renderer relies on.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PARAMS = ("x", "y", "l11", "l21", "l22", "r", "g", "b")
BYTES_PER_GAUSSIAN = 16  # 8 float16 numbers
SUFFIX = ".splats.npy"


class SplatFormatError(ValueError):
    """A splat array or file that cannot be rendered; the message says what is wrong."""


@dataclass
class Splats:
    """A batch of splat images: every image has N slots, the mask says which are live."""

    params: torch.Tensor  # [B, N, 8]
    mask: torch.Tensor  # [B, N] bool
    height: int
    width: int

    def live_counts(self) -> list[int]:
        return self.mask.sum(1).tolist()

    def nbytes(self) -> list[int]:
        return [BYTES_PER_GAUSSIAN * n for n in self.live_counts()]

    def encode(self, i: int) -> np.ndarray:
        """Image i as float16 [n, 8], live Gaussians only."""
        return encode(self.params[i][self.mask[i]])

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], height: int, width: int, device=None) -> "Splats":
        """Stack [n_i, 8] arrays into one batch padded to the largest n, with a mask."""
        n = max((len(a) for a in arrays), default=0)
        params = torch.zeros(len(arrays), max(n, 1), 8, device=device)
        mask = torch.zeros(len(arrays), max(n, 1), dtype=torch.bool, device=device)
        for i, a in enumerate(arrays):
            params[i, : len(a)] = torch.from_numpy(a.astype(np.float32))
            mask[i, : len(a)] = True
        params[~mask] = torch.tensor([0.5, 0.5, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], device=device)
        return cls(params, mask, height, width)


def encode(params: torch.Tensor) -> np.ndarray:
    """[n, 8] float tensor -> validated float16 array [n, 8]."""
    arr = params.detach().to("cpu", torch.float32).numpy().astype(np.float16)
    return validate(arr, "encoded splats")


def validate(arr, where: str = "splats") -> np.ndarray:
    """Check shape, dtype, finiteness and l11, l22 > 0; raise SplatFormatError naming the fault."""
    if not isinstance(arr, np.ndarray):
        raise SplatFormatError(f"{where}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.float16:
        raise SplatFormatError(f"{where}: dtype {arr.dtype}, expected float16")
    if arr.ndim != 2 or arr.shape[1] != 8:
        raise SplatFormatError(f"{where}: shape {list(arr.shape)}, expected [n, 8]")
    bad = ~np.isfinite(arr).all(1)
    if bad.any():
        raise SplatFormatError(f"{where}: {int(bad.sum())} Gaussians have NaN or infinite parameters")
    for col in (2, 4):
        nonpos = arr[:, col] <= 0
        if nonpos.any():
            raise SplatFormatError(f"{where}: {int(nonpos.sum())} Gaussians have {PARAMS[col]} <= 0")
    return arr


def to_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, validate(arr), allow_pickle=False)
    return buf.getvalue()


def from_bytes(data: bytes, where: str = "splats") -> np.ndarray:
    """Parse .npy bytes without pickle and validate them."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise SplatFormatError(f"{where}: not a plain .npy array (object arrays are refused)") from None
        if "EOF" in str(err):
            raise SplatFormatError(f"{where}: truncated ({err})") from None
        raise SplatFormatError(f"{where}: not a plain .npy array ({err})") from None
    except (OSError, EOFError) as err:
        raise SplatFormatError(f"{where}: truncated or not a .npy file ({err})") from None
    return validate(arr, where)


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    name = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem
    return path.with_name(name + ".json")


def save(path: str | Path, arr: np.ndarray, meta: dict) -> None:
    """Write NAME.splats.npy and NAME.json."""
    path = Path(path)
    path.write_bytes(to_bytes(arr))
    meta_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a splat file and its metadata (an empty dict when NAME.json is absent)."""
    path = Path(path)
    arr = from_bytes(path.read_bytes(), str(path))
    meta_file = meta_path(path)
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return arr, meta
