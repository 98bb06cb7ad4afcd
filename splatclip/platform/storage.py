"""One API over local paths, file:// and s3:// (through fsspec and s3fs).

Writes are all-or-nothing: `atomic_write` yields a file that becomes visible under its final name
only when the block ends without an exception. Locally the data goes to a hidden file beside the
target and is renamed over it; on S3 an object appears only when its upload completes, and a failed
block aborts the multipart upload.

A job that owns an output directory passes it as `root` to every write and removal inside it: a
local path there is then checked, before each directory is made, each file written and each rename
or removal, for a symbolic link at any of its components below the root, and refused (`LinkError`)
where there is one. On a shared filesystem another user may plant such a link to point the job's
writes anywhere the job may write; the root itself may be a link (the user named it).

Failures: every request to S3 is retried by botocore and s3fs as `StorageSpec` configures them
(`storage_options`); nothing here retries again. What still fails leaves this module as a
`StorageError` naming the operation and the URL (credentials redacted), never as a half-written
file: a write is checked against the bytes given before it counts as done, and a read against
the object's size (a streamed one here, a whole one by the HTTP client's Content-Length check). A missing file stays a FileNotFoundError (callers decide what that means).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import uuid
from typing import IO, Iterator

import braceexpand
import fsspec

from splatclip.platform.secrets import redact
from splatclip.platform.specs import StorageSpec

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


class LinkError(OSError):
    """A path a job writes inside its output passes through a symbolic link there."""


class StorageError(RuntimeError):
    """A storage operation failed after the configured retries: 'write s3://b/k: SlowDown ...'."""


def describe(err: BaseException) -> str:
    """One line for a storage failure: a full disk says "no space"; credentials never shown."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "no space left on device"
    text = " ".join(str(err).split()) or type(err).__name__
    cause = err.__cause__ or err.__context__  # s3fs turns botocore's error into an OSError; its code is there
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return redact(f"{code or type(err).__name__}: {text}")[:400]


@contextlib.contextmanager
def guarded(op: str, url: str) -> Iterator[None]:
    """Turn a failure of storage inside the block into a StorageError naming `op` and `url`. A missing
    file, a refused link and an error already named pass through unchanged."""
    try:
        yield
    except (FileNotFoundError, LinkError, StorageError):
        raise
    except Exception as err:
        raise StorageError(f"{op} {redact(url)}: {describe(err)}") from err


def storage_failure(err: BaseException) -> str | None:
    """The message of the StorageError behind `err` (through Ray's and Ray Data's wrappers and
    exception chains), or None when storage did not cause it."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is StorageError:
            return str(e)
        # a worker's error reaches the driver as text: Ray keeps the remote traceback, not the chain
        found = _REMOTE.findall(str(e))
        if found:
            return found[-1]
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


_REMOTE = re.compile(rf"^{re.escape(StorageError.__module__)}\.StorageError: (.+)$", re.MULTILINE)


def check_no_links(url: str, root: str | None) -> None:
    """LinkError when the local `url` lies under `root` with a symbolic link at a component below
    it, or lies outside `root`. Nothing to check for object storage (no links) or without a root."""
    if root is None or not is_local(url):
        return
    base = os.path.abspath(_local_path(root))
    path = os.path.abspath(_local_path(url))
    rel = os.path.relpath(path, base)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise LinkError(f"{path} is outside the output {base}")
    current = base
    for part in rel.split(os.sep):
        if part in ("", os.curdir):
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise LinkError(f"{current} is a symbolic link inside the output {base}; the job writes there only "
                            "through real directories and files (remove the link)")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def storage_options(url: str, spec: StorageSpec | None) -> dict:
    """fsspec options for `url`; only S3 takes any. Unset credentials and endpoint leave s3fs to
    its AWS defaults; the retry policy is always the spec's (its defaults without one)."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    spec = spec or StorageSpec()
    opts: dict = {"anon": spec.anon}
    client: dict = {}
    if spec.endpoint_url:
        client["endpoint_url"] = spec.endpoint_url
    if spec.region:
        client["region_name"] = spec.region
    if client:
        opts["client_kwargs"] = client
    if spec.access_key_id is not None:
        opts["key"] = spec.access_key_id.get_secret_value()
    if spec.secret_access_key is not None:
        opts["secret"] = spec.secret_access_key.get_secret_value()
    opts["config_kwargs"] = {"retries": {"mode": spec.retry_mode, "total_max_attempts": spec.max_attempts},
                             "connect_timeout": spec.connect_timeout, "read_timeout": spec.read_timeout}
    return opts


def filesystem(url: str, spec: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, spec))
    if hasattr(fs, "retries"):  # s3fs's attempts per call: an attribute, not an option
        fs.retries = (spec or StorageSpec()).call_attempts
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


MAX_NAMES = 1_000_000  # names one pattern may expand to (a typo like {0..9999999999} must not hang a job)
MAX_BRACE_DEPTH = 32  # braces nested deeper than this are refused before they are counted
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


def pattern_size(pattern: str) -> int:
    """How many names `braceexpand` makes of `pattern`, counted from the pattern's grammar (the
    product of its braces, a list the sum of its items, a range its length, nested braces included)
    without making a single name: a refusal costs a pass over the pattern, not the names."""
    return _product_size(pattern, 0)


def _product_size(pattern: str, depth: int) -> int:
    """Names of a pattern: literals times each top-level brace expression (braceexpand's
    parse_pattern, counted)."""
    if depth > MAX_BRACE_DEPTH:
        raise ValueError(f"braces nested more than {MAX_BRACE_DEPTH} deep")
    size, start, level, pos = 1, 0, 0, 0
    while pos < len(pattern):
        ch = pattern[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            if level == 0:
                start = pos
            level += 1
        elif ch == "}":
            level -= 1
            if level == 0:
                size *= _expression_size(pattern[start + 1 : pos], depth + 1)
        pos += 1
    if level != 0:
        raise ValueError("unbalanced braces")
    return size


def _expression_size(expr: str, depth: int) -> int:
    """Names of the inside of one brace: a numeric or letter range, a comma list, or (neither) the
    literal braces around the expanded inside."""
    if m := _INT_RANGE.match(expr):
        start, end, step = int(m[1]), int(m[2]), int(m[3] or 1) or 1
        return len(range(start, end + 1, step) if start < end else range(start, end - 1, -step))
    if m := _CHAR_RANGE.match(expr):
        return len(braceexpand.make_char_range(m[1], m[2], m[3]))  # at most 52 letters
    items, start, level, pos = [], 0, 0, 0
    while pos < len(expr):
        ch = expr[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            level += 1
        elif ch == "}":
            level -= 1
        elif ch == "," and level == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if level != 0 or not items:
        return _product_size(expr, depth)
    return sum(_product_size(item, depth) for item in [*items, expr[start:]])


def expand_braces(pattern: str) -> list[str]:
    """'a/{00000..00002}.tar' -> ['a/00000.tar', 'a/00001.tar', 'a/00002.tar'] (zero padding kept).
    Raises ValueError past MAX_NAMES names, sized before any name is made."""
    size = pattern_size(pattern)
    if size > MAX_NAMES:
        raise ValueError(f"the pattern expands to {size:.3g} names, more than {MAX_NAMES}")
    return list(braceexpand.braceexpand(pattern))


def list_shards(pattern: str, spec: StorageSpec | None = None) -> tuple[list[str], list[str]]:
    """Expand a brace/glob pattern into (existing URLs, missing URLs), each in pattern order."""
    found: list[str] = []
    missing: list[str] = []
    for url in expand_braces(pattern):
        fs, path = filesystem(url, spec)
        with guarded("list", url):
            if any(ch in path for ch in "*?["):
                matches = sorted(fs.glob(path))
                found.extend(_unstrip(url, fs, m) for m in matches)
            else:  # not fs.isfile: it answers False for any error, an outage read as "missing"
                try:
                    is_file = fs.info(path)["type"] == "file"
                except FileNotFoundError:
                    is_file = False
                (found if is_file else missing).append(url)
    return found, missing


def _unstrip(url: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Put the protocol back on a path that fsspec returned without it."""
    if "://" not in url:
        return path
    protocol = url.split("://", 1)[0]
    return f"{protocol}://{path}"


def exists(url: str, spec: StorageSpec | None = None) -> bool:
    fs, path = filesystem(url, spec)
    with guarded("check", url):
        return fs.exists(path)


def read_bytes(url: str, spec: StorageSpec | None = None) -> bytes:
    """The whole object in one GET: a body shorter than its Content-Length is an error of the HTTP
    client (retried by s3fs, then a StorageError), never short data."""
    fs, path = filesystem(url, spec)
    with guarded("read", url):
        return fs.cat_file(path)


def listdir(url: str, spec: StorageSpec | None = None) -> list[str]:
    """Names of the files directly under a directory URL ([] when there is none)."""
    fs, path = filesystem(url, spec)
    try:
        with guarded("list", url):
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True))
    except FileNotFoundError:
        return []
    finally:  # s3fs caches what it listed (the parent's listing too, for a prefix that is not there), and
        fs.invalidate_cache(path)  # its `exists` answers from that cache: later objects would not exist


def remove(url: str, spec: StorageSpec | None = None, root: str | None = None) -> None:
    check_no_links(url, root)
    fs, path = filesystem(url, spec)
    with guarded("remove", url):
        fs.rm_file(path)


class _CheckedReader(io.RawIOBase):
    """A file being read whose failures are StorageErrors and whose end is checked against the
    size storage gave when it was opened."""

    def __init__(self, f, url: str, size: int | None):
        self.f, self.url, self.size, self.done = f, url, size, 0

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:
        """The rest in one read (not RawIOBase's 8 KiB at a time), checked against the size."""
        with guarded("read", self.url):
            data = self.f.read()
        self.done += len(data)
        if self.size is not None and self.done != self.size:
            raise StorageError(f"read {redact(self.url)}: the data ended at byte {self.done} of {self.size}")
        return data

    def readinto(self, buffer) -> int:
        with guarded("read", self.url):
            data = self.f.read(len(buffer))
        if not data and self.size is not None and self.done != self.size:
            raise StorageError(f"read {redact(self.url)}: the data ended at byte {self.done} of {self.size}")
        buffer[: len(data)] = data
        self.done += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


def open_read(url: str, spec: StorageSpec | None = None) -> IO[bytes]:
    """A buffered binary file; its read failures are StorageErrors, a short read one too."""
    fs, path = filesystem(url, spec)
    with guarded("open", url):
        f = fs.open(path, "rb")
        size = getattr(f, "size", None) if not is_local(url) else os.fstat(f.fileno()).st_size
    return io.BufferedReader(_CheckedReader(f, url, size), buffer_size=1 << 20)


@contextlib.contextmanager
def atomic_write(url: str, spec: StorageSpec | None = None, root: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file that appears at `url` whole when the block succeeds, and not at all otherwise.
    With `root`, no link below it is followed (see the module's docstring)."""
    fs, path = filesystem(url, spec)
    if is_local(url):
        directory, name = os.path.split(os.path.abspath(path))
        check_no_links(url, root)
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.part")
        try:
            with guarded("write", url):  # storage's own steps; an error of the caller's block stays its own
                os.makedirs(directory, exist_ok=True)
                check_no_links(tmp, root)
                f = open(tmp, "xb")  # never an existing file (nor a link planted at that name)
            with f:
                yield _Writes(f, url)
                with guarded("write", url):
                    f.flush()
                    os.fsync(f.fileno())
            check_no_links(url, root)
            with guarded("write", url):
                os.replace(tmp, os.path.join(directory, name))
        finally:
            if os.path.lexists(tmp) and not os.path.islink(tmp):
                os.unlink(tmp)
        return
    with guarded("write", url):
        f = fs.open(path, "wb")
    try:
        yield _Writes(f, url)
    except BaseException:
        f.discard()  # s3fs aborts the multipart upload; a small buffered file was never sent
        f.closed = True
        raise
    with guarded("write", url):
        f.close()
        written, stored = f.tell(), fs.info(path)["size"]
    if stored != written:  # never a part or shard whose object is not the bytes given
        raise StorageError(f"write {redact(url)}: storage holds {stored} bytes of the {written} written")


class _Writes:
    """A file being written whose failures (a full disk, storage that refuses) are StorageErrors."""

    def __init__(self, f, url: str):
        self.f, self.url = f, url

    def write(self, data) -> int:
        with guarded("write", self.url):
            return self.f.write(data)

    def flush(self) -> None:
        with guarded("write", self.url):
            self.f.flush()


def write_bytes(url: str, data: bytes, spec: StorageSpec | None = None, root: str | None = None) -> None:
    with atomic_write(url, spec, root) as f:
        f.write(data)


def write_json(url: str, obj, spec: StorageSpec | None = None, root: str | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), spec, root)


def read_json(url: str, spec: StorageSpec | None = None):
    return json.loads(read_bytes(url, spec))


def mark_success(directory: str, manifest: dict, spec: StorageSpec | None = None) -> None:
    """Write the manifest that says a whole output directory is finished (no link inside it followed)."""
    write_json(join(directory, SUCCESS), manifest, spec, root=directory)


def read_success(directory: str, spec: StorageSpec | None = None) -> dict | None:
    url = join(directory, SUCCESS)
    return read_json(url, spec) if exists(url, spec) else None
