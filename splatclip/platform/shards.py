"""webdataset shards on any storage URL: read sample by sample, best effort; write all-or-nothing.

Crawled shards are untrusted, so reading is ours rather than webdataset's iterator (which stops a
whole shard at a duplicate key): the byte stream comes from fsspec (s3:// works), gzip/bzip2/xz
streams are unpacked here with the unpacked bytes counted, and Python's tarfile parses headers in
stream mode. Members are grouped into samples by webdataset's rule (key = path up to the first dot
of the file name, extension = the rest, lower-cased). Every damage costs only what it touches:

- a member over `max_member_bytes` (its declared size, sparse members expanded) is never read;
- a member name reserved for this reader (`KEY.__error__`), an unsafe or undecodable key, a member
  repeated within a sample, or a key seen before in the shard (the first sample is kept) is dropped;
- a damaged header is skipped (the reader resynchronises on the next valid header);
- a truncated or corrupt tail, or bytes beyond `max_shard_bytes` (or samples beyond
  `max_shard_samples`), end the shard after the samples before it.

Each such problem travels with its sample in `__problems__` (a list of (member, reason, detail)); a
problem with no whole sample left (a dropped duplicate, the damaged tail) comes as a sample with no
members. A sample is a dict: `__key__`, `__url__`, one bytes value per extension ("jpg", "txt",
"splats.npy", ...), and `__problems__` when there are any. A shard that cannot be opened, or is not
a tar archive at all, raises `ShardError`.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import posixpath
import re
import tarfile
from typing import IO, Iterable, Iterator

from splatclip.platform.secrets import redact
from splatclip.platform.specs import DEFAULT_LIMITS, ShardLimits, StorageSpec
from splatclip.platform.storage import StorageError, atomic_write, open_read

RESERVED = "__"  # extensions starting with this are the reader's own fields, never members
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]+)$")  # webdataset's key/extension split
_MAGIC = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), b"BZh": lambda f: bz2.BZ2File(f, "rb"),
          b"\xfd7zXZ\x00": lambda f: lzma.LZMAFile(f, "rb")}


class ShardError(Exception):
    """A shard that cannot be read at all (missing, unreachable, not a tar archive)."""


class ShardTooLarge(Exception):
    pass


def unsafe_key(key: str) -> str | None:
    """Why a member key may not be used (absolute, climbing out of the archive, not text), or None."""
    if key.startswith("/") or posixpath.isabs(key):
        return "absolute path in tar"
    if ".." in key.split("/"):
        return "path outside the archive"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "control character in name"
    if len(key) > 512:
        return "name longer than 512 characters"
    return None


class _Counted:
    """A read-only stream that raises ShardTooLarge once more than `limit` bytes were read from it."""

    def __init__(self, raw: IO[bytes], limit: int):
        self.raw, self.limit, self.count = raw, limit, 0

    def read(self, n: int = -1) -> bytes:
        want = self.limit + 1 - self.count if n is None or n < 0 else min(n, self.limit + 1 - self.count)
        data = self.raw.read(max(want, 0))
        self.count += len(data)
        if self.count > self.limit:
            raise ShardTooLarge(f"more than {self.limit} bytes of tar data")
        return data


def _unpacked(raw: IO[bytes]) -> IO[bytes]:
    """The tar bytes of a stream, unpacking gzip, bzip2 or xz (told by their magic bytes)."""
    head = raw.read(6)
    rest = _Prefixed(head, raw)
    for magic, opener in _MAGIC.items():
        if head.startswith(magic):
            return opener(rest)
    return rest


class _Prefixed:
    """`head` (bytes already read) followed by the rest of `raw`."""

    def __init__(self, head: bytes, raw: IO[bytes]):
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.raw.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.raw.read(n - len(out)) if len(out) < n else b"")


class _Sample:
    def __init__(self, key: str):
        self.key, self.members, self.problems = key, {}, []

    def record(self, url: str) -> dict:
        out = {"__key__": self.key, "__url__": url, **self.members}
        if self.problems:
            out["__problems__"] = self.problems
        return out


def read_samples(url: str, spec: StorageSpec | None = None, limits: ShardLimits = DEFAULT_LIMITS,
                 wanted: Iterable[str] | None = None) -> Iterator[dict]:
    """Samples of one tar shard in archive order (see the module docstring). Only members whose
    extension is in `wanted` (all when None) are read. Raises ShardError when the shard cannot be
    opened or is not a tar archive. Storage that fails (after its retries) is not damage: it raises
    StorageError, wherever in the shard it happens, and no sample of the shard is judged by it."""
    wanted = None if wanted is None else set(wanted)
    try:
        stream = open_read(url, spec)
    except StorageError:
        raise
    except Exception as err:
        raise ShardError(f"cannot open: {type(err).__name__}: {redact(str(err))}") from None
    with stream:
        try:
            counted = _Counted(_unpacked(stream), limits.max_shard_bytes)
            tar = tarfile.open(fileobj=counted, mode="r|", tarinfo=_BoundedTarInfo)
        except StorageError:
            raise
        except Exception as err:
            raise ShardError(f"not a tar archive ({type(err).__name__}: {redact(str(err))})") from None
        yield from _samples(tar, url, limits, wanted)


def _samples(tar: tarfile.TarFile, url: str, limits: ShardLimits, wanted: set[str] | None) -> Iterator[dict]:
    seen: set[str] = set()
    current: _Sample | None = None
    expected = 0  # where the next header should start; a later start means damaged bytes were skipped
    while True:
        try:
            member = tar.next()
        except StorageError:
            raise
        except Exception as err:  # a damaged tail or compressed stream: the shard ends here
            if current is not None:
                yield current.record(url)
                current = None
            yield _tail(url, err, tar.offset)
            return
        tar.ignore_zeros = True  # past the first header: skip damaged headers (and end markers) and go on
        tar.members.clear()  # stream mode keeps every header otherwise
        if member is None:
            break
        if member.offset > expected > 0:
            after = f" after sample {current.key!r}" if current is not None else ""
            yield {"__key__": "", "__url__": url, "__problems__": [
                ("", "damaged_archive", f"{member.offset - expected} bytes skipped at tar offset {expected}{after} "
                 "(a damaged header; the members it held are lost)")]}
        expected = tar.offset
        match = _KEY.match(member.name) if member.isfile() else None
        if match is None:  # directories, links, names without an extension: not part of any sample
            continue
        key, ext = match.group(1), match.group(2).lower()
        if current is None or key != current.key:
            if current is not None:
                yield current.record(url)
            if len(seen) >= limits.max_shard_samples:
                yield {"__key__": "", "__url__": url, "__problems__": [
                    ("", "shard_too_large", f"more than {limits.max_shard_samples} samples; the rest of the shard "
                     "is not read")]}
                return
            current = _Sample(key)
            why = unsafe_key(key)
            if why:
                current.problems.append(("", "unsafe_path", why))
            elif key in seen:
                current.problems.append(("", "duplicate_key", "a sample with this key came earlier in the shard"))
            seen.add(key)
        if any(reason in ("unsafe_path", "duplicate_key") for _, reason, _ in current.problems):
            continue
        if ext.startswith(RESERVED):
            current.problems.append((ext, "reserved_name", f"member extension {ext!r} is reserved"))
            continue
        if wanted is not None and ext not in wanted:
            continue
        if ext in current.members:
            current.problems.append((ext, "duplicate_member", "a second member with this extension"))
            continue
        if member.size > limits.max_member_bytes:
            current.problems.append((ext, "member_too_large",
                                     f"{member.size} bytes (limit {limits.max_member_bytes})"))
            continue
        try:
            current.members[ext] = tar.extractfile(member).read()
        except StorageError:
            raise
        except Exception as err:  # the data ends (or the stream breaks) inside this member
            current.members.clear()
            current.problems.append((ext, *_ending(err)))
            yield current.record(url)
            return
    if current is not None:
        yield current.record(url)


def _ending(err: Exception) -> tuple[str, str]:
    """(reason, detail) for an error that ends a shard."""
    reason = "shard_too_large" if isinstance(err, ShardTooLarge) else "truncated"
    return reason, f"{type(err).__name__}: {redact(str(err))}"


def _tail(url: str, err: Exception, offset: int) -> dict:
    reason, detail = _ending(err)
    return {"__key__": "", "__url__": url, "__problems__": [("", reason, f"the shard ends at tar offset {offset}: "
                                                            f"{detail}")]}


class _BoundedTarInfo(tarfile.TarInfo):
    """A header whose extended records (pax, GNU long names) tarfile would read whole into memory
    is refused past a small size, as a damaged header."""

    MAX_EXTENDED = 1 << 20

    def _proc_member(self, tarfile_):
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > self.MAX_EXTENDED:
            raise tarfile.InvalidHeaderError(f"extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)


def problems(sample: dict) -> list[tuple[str, str, str]]:
    """The (member, reason, detail) problems a sample came with."""
    return sample.get("__problems__", [])


@contextlib.contextmanager
def write_shard(url: str, spec: StorageSpec | None = None,
                root: str | None = None) -> Iterator["webdataset.TarWriter"]:  # noqa: F821
    """A webdataset TarWriter whose shard appears at `url` only if the block completes (no link
    below `root` followed). Write samples as {"__key__": k, "ext": bytes, ...}."""
    import webdataset as wds  # here, not at the top: importing it loads torch, which readers never need

    with atomic_write(url, spec, root) as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0)  # a fixed time: the same samples, the same bytes
        yield writer
        writer.close()
