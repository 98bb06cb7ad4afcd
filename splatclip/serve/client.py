"""The device side: post a splat file to the serve application, and what the same image costs as
PNG or JPEG (the bytes the splats replace on the way to the cloud)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import torch

TOKEN_ENV = "SPLATCLIP_SERVE_TOKEN"  # the bearer token, read from the environment (never an argument)
JPEG_QUALITY = 90


def post(url: str, data: bytes, token: str | None = None, timeout: float = 60.0,
         content_type: str = "application/octet-stream") -> tuple[int, dict]:
    """(HTTP status, the JSON answer) of POSTing `data` to `url`."""
    return call(url, data, token, timeout, {"Content-Type": content_type})


def recipe(url: str, token: str | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    """(HTTP status, the JSON answer) of a GET of the application: the fit settings its encoder's
    training splats were made with (`fit`), the Gaussians it accepts, its classes."""
    return call(url, None, token, timeout, {})


def call(url: str, data: bytes | None, token: str | None, timeout: float, headers: dict) -> tuple[int, dict]:
    """(HTTP status, the JSON answer) of a POST of `data`, or of a GET when it is None."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if token:
        headers = {**headers, "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, as_answer(reply.read())
    except urllib.error.HTTPError as err:  # a 4xx/5xx still carries the service's JSON
        return err.code, as_answer(err.read())


def as_answer(body: bytes) -> dict:
    """A reply's body as the service's JSON object, or {"error": its first bytes} when it is not one
    (another server at the URL, a proxy's page)."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    return answer if isinstance(answer, dict) else {"error": body[:200].decode("utf-8", "replace")}


def encoded_sizes(image: torch.Tensor) -> dict[str, int]:
    """image [3, H, W] in [0, 1] -> bytes as PNG and as JPEG (quality JPEG_QUALITY); a gray image
    (three equal channels) is encoded as one channel, as a device would send it."""
    from PIL import Image

    from splatclip.pictures import to_uint8

    pixels = to_uint8(image)  # [H, W, 3]
    gray = (pixels == pixels[..., :1]).all()
    picture = Image.fromarray(pixels[..., 0] if gray else pixels)
    sizes = {}
    for fmt, options in (("PNG", {"optimize": True}), ("JPEG", {"quality": JPEG_QUALITY})):
        buf = io.BytesIO()
        picture.save(buf, fmt, **options)
        sizes[fmt] = len(buf.getvalue())
    return sizes


def describe(answer: dict) -> str:
    """One line of an answer: its top classes, or the embedding's size."""
    if answer.get("classes"):
        return ", ".join(f"{c['name']} {c['score']:.3f}" for c in answer["classes"])
    return f"embedding of {len(answer.get('embedding', []))} numbers"


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 300) -> float:
    """Seconds until the application at `url` answers a GET (its recipe, or its 401 without the
    token); RuntimeError if the serve job `server` exits first or `seconds` pass."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if server.poll() is not None:
            raise RuntimeError(f"the serve job exited with {server.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=5)
            return time.monotonic() - start
        except urllib.error.HTTPError as err:  # before the application is deployed, Serve's proxy answers 404/503
            if err.code == 401:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")
