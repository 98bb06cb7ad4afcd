"""S3 that fails on purpose: moto's server on loopback, and a proxy in front of it that answers a
share of requests with the faults object storage really produces.

    moto = start_moto(log_path)              # (process, endpoint)
    proxy = FaultProxy(endpoint, seed=0)     # its own loopback port: proxy.url
    proxy.set(Fault("slowdown", 0.1, method="PUT", key=r"/_parts/"))
    ... point a StorageSpec's endpoint_url at proxy.url ...
    proxy.injected                           # Counter: {"slowdown": 7}
    proxy.close()

Faults, each for a share (`rate`) of the requests whose method and path match:

    slowdown      503 SlowDown (throttling), nothing forwarded
    error500      500 InternalError, nothing forwarded
    reset_before  the connection reset before the request reaches storage
    reset_after   the request done by storage, then the connection reset before any answer
    truncate      the answer's headers as storage sent them, half its body, then the connection closed
    delay         the request forwarded after `seconds`

Whether a request fails is a function of (seed, method, path, how many times that method and path
were asked before): a run is repeatable whatever the order concurrent requests arrive in, and a
retry of a failed request is decided afresh (so a 10% fault rate fails a request twice 1% of the time).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from splatclip.platform.runtime import free_port

KINDS = ("slowdown", "error500", "reset_before", "reset_after", "truncate", "delay")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Fault:
    kind: str
    rate: float
    method: str | None = None  # GET, PUT, POST, HEAD, DELETE; None: any
    key: str | None = None  # a regular expression searched in the request's path and query; None: any
    seconds: float = 0.5  # for `delay`

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {', '.join(KINDS)}")

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (self.key is None or re.search(self.key, target))


def bucket_name(test_id: str) -> str:
    """A bucket name of a test's own, the same in every run: faults are decided by request path, so
    a fixed name makes a test's faults repeatable (a random one draws other faults each run)."""
    return f"t-{hashlib.sha256(test_id.encode()).hexdigest()[:20]}"


def start_moto(log: Path, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port: (its process, its endpoint URL)."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=out)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return proc, endpoint
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto did not listen within {timeout}s")
            time.sleep(0.3)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that injects the configured faults."""

    def __init__(self, upstream: str, seed: int = 0):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.seed = seed
        self.faults: tuple[Fault, ...] = ()
        self.lock = threading.Lock()
        self.seen: Counter = Counter()  # (method, target) -> times asked
        self.injected: Counter = Counter()  # fault kind -> times injected
        self.requests: Counter = Counter()  # method -> requests received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, *faults: Fault) -> None:
        """Replace the faults (none: every request forwarded as it is) and zero the counts."""
        with self.lock:
            self.faults = faults
            self.seen.clear()
            self.injected.clear()
            self.requests.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, method: str, target: str) -> Fault | None:
        with self.lock:
            n = self.seen[method, target]
            self.seen[method, target] += 1
            self.requests[method] += 1
            digest = hashlib.sha256(f"{self.seed}|{method}|{target}|{n}".encode()).digest()
            draw = struct.unpack("<Q", digest[:8])[0] / 2**64  # uniform in [0, 1)
            for fault in self.faults:
                if fault.matches(method, target):
                    if draw < fault.rate:
                        self.injected[fault.kind] += 1
                        return fault
                    draw -= fault.rate
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the counts say what happened
                pass

            def do_any(self):
                body = self._read_body()
                fault = proxy.decide(self.command, self.path)
                kind = fault.kind if fault else None
                if kind in ERRORS:
                    return self._error(*ERRORS[kind])
                if kind == "reset_before":
                    return self._reset()
                if kind == "delay":
                    time.sleep(fault.seconds)
                status, reason, headers, data = self._forward(body)
                if kind == "reset_after":
                    return self._reset()
                self.send_response_only(status, reason)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = int(dict((k.lower(), v) for k, v in headers).get("content-length", len(data)))
                self.send_header("Content-Length", str(length if self.command == "HEAD" else len(data)))
                self.end_headers()
                if kind == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_WR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_any

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            break
                        chunks.append(chunk)
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, resp.reason, resp.getheaders(), data
                finally:
                    conn.close()

            def _error(self, status: int, code: str, message: str) -> None:
                data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _reset(self) -> None:
                """Close with an RST (SO_LINGER 0), as a dropped connection reaches the client."""
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()

        return Handler
