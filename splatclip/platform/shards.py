"""webdataset shards on any storage URL: read sample by sample, write all-or-nothing.

webdataset opens only local files, pipes and HTTP by itself; here the byte stream comes from fsspec
(so s3:// works) and webdataset's own tar iterator and key grouping turn it into samples. A sample
is a dict: `__key__`, `__url__` and one bytes value per extension ("jpg", "txt", "splats.npy", ...).
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from splatclip.platform.specs import StorageSpec
from splatclip.platform.storage import atomic_write, open_read


def unsafe_key(key: str) -> str | None:
    """Why a member name may not be used (absolute, or climbing out of the archive), or None."""
    if key.startswith("/") or posixpath.isabs(key):
        return "absolute path in tar"
    if ".." in key.split("/"):
        return "path outside the archive"
    return None


def read_samples(url: str, spec: StorageSpec | None = None) -> Iterator[dict]:
    """Samples of one tar shard in archive order. A sample whose member path is unsafe comes back
    with only `__key__`, `__url__` and `__error__`. A corrupt archive raises (tarfile.TarError,
    OSError) after the samples before the damage."""
    with open_read(url, spec) as stream:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            why = unsafe_key(sample["__key__"])
            if why:
                yield {"__key__": sample["__key__"], "__url__": url, "__error__": why}
            else:
                yield sample


@contextlib.contextmanager
def write_shard(url: str, spec: StorageSpec | None = None) -> Iterator[wds.TarWriter]:
    """A webdataset TarWriter whose shard appears at `url` only if the block completes.
    Write samples as {"__key__": k, "ext": bytes, ...}."""
    with atomic_write(url, spec) as f:
        writer = wds.TarWriter(f, encoder=False)
        yield writer
        writer.close()
