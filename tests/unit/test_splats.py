import io

import numpy as np
import pytest
import torch

from splatclip import splats
from splatclip.splats import SplatFormatError, Splats


def good(n=5):
    a = np.zeros((n, 8), np.float16)
    a[:, 0:2] = 0.5
    a[:, 2] = a[:, 4] = 0.01
    a[:, 5:8] = 0.3
    return a


def test_codec_keeps_live_only_and_bytes_are_exact(tmp_path):
    params = torch.tensor(good(6), dtype=torch.float32)[None].repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    s = Splats(params, mask, 32, 48)
    assert s.live_counts() == [4, 6] and s.nbytes() == [64, 96]
    arr = s.encode(0)
    assert arr.dtype == np.float16 and arr.shape == (4, 8) and arr.nbytes == 64
    path = tmp_path / "img.splats.npy"
    splats.save(path, arr, {"height": 32, "width": 48})
    back, meta = splats.load(path)
    assert np.array_equal(back, arr) and meta == {"height": 32, "width": 48}
    assert (tmp_path / "img.json").exists()
    batch = Splats.from_arrays([back, good(2)], 32, 48)
    assert batch.params.shape == (2, 4, 8) and batch.mask.sum(1).tolist() == [4, 2]


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def object_npy() -> bytes:
    """A .npy whose header declares an object array (what a pickled payload would carry); the
    payload is junk, since the loader must refuse at the header without unpickling anything."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    buf.write(b"\x80\x04junk that is never unpickled")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (npy(good().astype(np.float32)), "dtype float32, expected float16"),
        (npy(good()[:, :7]), r"shape \[5, 7\], expected \[n, 8\]"),
        (npy(good()[None]), r"shape \[1, 5, 8\]"),
        (npy(np.where(np.arange(8) == 5, np.nan, good()).astype(np.float16)), "NaN or infinite"),
        (object_npy(), "not a plain .npy array"),
        (npy(good())[:-7], "truncated"),
        (b"", "truncated"),
        (npy(good() * np.array([1, 1, -1, 1, 1, 1, 1, 1], np.float16)), "l11 <= 0"),
        (npy(good() * np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float16)), "l22 <= 0"),
    ],
    ids=["dtype", "columns", "ndim", "nan", "object", "truncated", "empty", "l11", "l22"],
)
def test_corrupt_files_raise_clear_errors(tmp_path, data, message):
    path = tmp_path / "bad.splats.npy"
    path.write_bytes(data)
    with pytest.raises(SplatFormatError, match=message) as info:
        splats.load(path)
    assert str(path) in str(info.value)
