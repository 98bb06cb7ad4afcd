"""One job at a time on an output: a lease the job takes before it writes and holds while it runs.

    OUTPUT/_lease.json   {"job", "token", "host", "pid", "ray_job", "started", "renewed"}

The lease is taken by a create-if-absent write (S3: `If-None-Match: *`; local: a hard link, which
fails when the name exists), renewed every `ttl / 4` seconds by a thread of the job's driver with a
compare-and-swap (S3: `If-Match` its ETag; local: the same check under a file lock), and removed at
the end. A second job that finds it held refuses at start, naming the first. A lease whose holder is
gone is taken over (by the same compare-and-swap, so two jobs racing for it cannot both win): at
once when the holder ran on this host and its process no longer exists (a killed job's rerun), or
when it has not been renewed for `ttl` seconds (a lost node).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from splatclip.platform import storage
from splatclip.platform.secrets import redact
from splatclip.platform.specs import StorageSpec

log = logging.getLogger(__name__)
NAME = "_lease.json"
TTL = 60.0  # seconds without a renewal after which a holder on another host counts as gone


class LeaseHeld(Exception):
    """Another job holds the lease: the message names it."""


def holder_alive(holder: dict, ttl: float, now: float) -> bool:
    """Whether the job that wrote `holder` may still be running."""
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, KeyError, TypeError):
            pass
    return now - float(holder.get("renewed", 0)) < ttl


def describe_holder(holder: dict, now: float) -> str:
    ray_job = f", Ray job {holder['ray_job']}" if holder.get("ray_job") else ""
    return (f"the {holder.get('job', '?')} job started {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.get('started', 0)))} "
            f"UTC on {holder.get('host', '?')} (pid {holder.get('pid', '?')}{ray_job}), renewed "
            f"{now - float(holder.get('renewed', 0)):.0f} s ago")


class Lease:
    def __init__(self, directory: str, spec: StorageSpec, job: str, ttl: float = TTL):
        self.url = storage.join(directory, NAME)
        self.spec, self.ttl = spec, ttl
        self.record = {"job": job, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "ray_job": os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID") or ""}
        self.version = None  # what the stored lease is now, when it is ours (S3: its ETag; local: its bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming its holder; then keep it renewed."""
        now = time.time()
        self.record.update(started=now, renewed=now)
        if not self._create():
            current, version = self._read()
            if current is not None and current.get("token") != self.record["token"]:
                if holder_alive(current, self.ttl, now):
                    raise LeaseHeld(f"{redact(self.url)} is held by {describe_holder(current, now)}; wait for it to end "
                                    f"(a job that died frees it within {self.ttl:.0f} s)")
                log.warning("taking over the lease of %s from %s, which is gone", redact(self.url),
                            describe_holder(current, now))
            if current is None or not self._swap(version):
                raise LeaseHeld(f"{redact(self.url)} was taken by another job starting at the same moment")
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.version is None:
            return
        try:
            self._remove()
        except Exception as err:  # storage down at the end: the lease expires by itself
            log.warning("could not remove the lease %s: %s", redact(self.url), storage.describe(err))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self.record["renewed"] = time.time()
            try:
                if not self._swap(self.version):
                    log.error("the lease %s was taken over by another job; this one goes on, but the output may mix "
                              "two jobs' writes", redact(self.url))
                    return
            except Exception as err:  # one missed renewal is harmless; TTL allows three more
                log.warning("renewing the lease %s failed: %s", redact(self.url), storage.describe(err))

    # the three storage primitives, for S3 and for a local filesystem

    def _data(self) -> bytes:
        return json.dumps(self.record, sort_keys=True).encode()

    def _create(self) -> bool:
        data = self._data()
        if storage.is_local(self.url):
            path = _local(self.url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{self.record['token']}"
            with open(tmp, "xb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # fails when the lease exists: the create is atomic with its content
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            self.version = data
            return True
        return self._put(data, IfNoneMatch="*")

    def _read(self) -> tuple[dict | None, object]:
        if storage.is_local(self.url):
            try:
                with open(_local(self.url), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None, None
            return _parse(data), data
        fs, bucket, key = self._object()
        with storage.guarded("read", self.url):
            try:
                resp = fs.call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None, None
            data = _read_body(fs, resp)
        return _parse(data), resp["ETag"]

    def _swap(self, version) -> bool:
        """Replace the lease with this job's record if it is still `version`."""
        data = self._data()
        if storage.is_local(self.url):
            with _locked(_local(self.url)):
                try:
                    with open(_local(self.url), "rb") as f:
                        if f.read() != version:
                            return False
                except FileNotFoundError:
                    return False
                storage.write_bytes(self.url, data)
            self.version = data
            return True
        return self._put(data, IfMatch=version)

    def _remove(self) -> None:
        if storage.is_local(self.url):
            with _locked(_local(self.url)):
                with contextlib.suppress(FileNotFoundError):
                    with open(_local(self.url), "rb") as f:
                        if f.read() == self.version:
                            os.unlink(_local(self.url))
            return
        fs, bucket, key = self._object()
        with storage.guarded("remove", self.url), contextlib.suppress(FileNotFoundError, PermissionError):
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.version)

    def _object(self):
        """(s3fs filesystem, bucket, key) of the lease on object storage."""
        fs, path = storage.filesystem(self.url, self.spec)
        bucket, key = path.split("/", 1)
        return fs, bucket, key

    def _put(self, data: bytes, **condition) -> bool:
        """A conditional PUT: True when it was applied. A retried PUT whose first attempt was applied
        fails its condition; the stored record's token tells that case from another job's lease."""
        fs, bucket, key = self._object()
        with storage.guarded("write", self.url):
            try:
                resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
            except FileExistsError:  # s3fs's word for 412 Precondition Failed
                resp = None
        if resp is None:
            current, version = self._read()
            if current is None or current != self.record:
                return False
            resp = {"ETag": version}
        self.version = resp["ETag"]
        return True


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _parse(data: bytes) -> dict:
    try:
        out = json.loads(data)
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}  # not ours to read: a lease nobody renews, taken over after TTL


def _read_body(fs, resp) -> bytes:
    from fsspec.asyn import sync

    async def read():
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    return sync(fs.loop, read)


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on `path + '.lock'` for one compare-and-swap of a local lease."""
    with open(path + ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
