"""The serve application on loopback: throughput and latency at 1, 8 and 32 concurrent clients, and
the bytes a request carries against the PNG and JPEG of the same image.

    make demo && python benchmarks/serve.py              # the demo's registered 49-Gaussian encoder
    python benchmarks/serve.py --root outputs/demo --requests 400

The serve job (`jobs/serve.py`, one replica with 2 CPUs on a local Ray, batches of up to 32) serves
the model the demo registered; each client is a thread posting the splat files the demo's fit job
wrote for the held-out digits, one request at a time, until the level's requests are done. Latency is
from send to the parsed answer. Bytes: each splat file as posted (.npy, float16 [n, 8] with its
128-byte header) against the same image at the size it was fitted at, as PNG and as JPEG (quality
90); the digits, and the demo's photos (200 Gaussians at 128x128).

The last line: `serve: N req/s at 32 clients, p99 X ms; splat bytes / JPEG bytes R`.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from splatclip.platform.runtime import free_port
from splatclip.platform.shards import read_samples
from splatclip.serve.client import encoded_sizes, post, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
MODEL = "splatclip-digits-g49"  # what the demo registers
LEVELS = (1, 8, 32)


def start(root: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SPLATCLIP_SERVE_TOKEN")}
    args = [f"model=models:/{MODEL}/latest", f"tracking.uri=sqlite:///{root}/mlflow.db", f"port={port}",
            "ray.num_cpus=3", "ray.cpus_per_actor=2", "batch.max_size=32"]
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), *[f"--set={a}" for a in args]], cwd=root,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def level(url: str, payloads: list[bytes], clients: int, requests: int) -> dict:
    """`clients` threads posting until `requests` are answered: req/s, p50, p99 (ms), errors."""
    latencies, errors, lock = [], [0], threading.Lock()
    counter = iter(range(requests))

    def client():
        for i in counter:  # the shared iterator hands each request to one client
            data = payloads[i % len(payloads)]
            sent = time.perf_counter()
            status, _ = post(url, data)
            with lock:
                latencies.append(time.perf_counter() - sent)
                errors[0] += status != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"rps": requests / seconds, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "errors": errors[0]}


def sizes(splat_shards: list[Path], source_shards: list[Path]) -> dict:
    """Mean bytes of the splat files, and of the same images at the size they were fitted at as PNG
    and JPEG."""
    import json

    from splatclip.fitting.images import clip_crop, decode

    fitted = [s for p in splat_shards for s in read_samples(str(p))]
    size = json.loads(fitted[0]["json"])["height"]
    png, jpeg = [], []
    for p in source_shards:
        for s in read_samples(str(p)):
            encoded = encoded_sizes(clip_crop(decode(s.get("png") or s.get("jpg")), size))
            png.append(encoded["PNG"])
            jpeg.append(encoded["JPEG"])
    return {"splat": float(np.mean([len(s["splats.npy"]) for s in fitted])), "png": float(np.mean(png)),
            "jpeg": float(np.mean(jpeg)), "n": len(fitted), "size": size}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT / "outputs" / "demo"), help="where `make demo` ran")
    ap.add_argument("--requests", type=int, default=320, help="requests at each level")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    tests = sorted((root / "splats" / "g49").glob("test-*.tar"))
    if not (root / "mlflow.db").exists() or not tests:
        raise SystemExit(f"{root}: no demo outputs (run `make demo` first)")
    payloads = [bytes(s["splats.npy"]) for p in tests for s in read_samples(str(p))]
    port = free_port()
    url = f"http://127.0.0.1:{port}/embed"
    server = start(root, port)
    try:
        up = wait_until_up(url, server)
        level(url, payloads, 4, 32)  # warm-up: the first batches of each size
        print(f"serve on loopback: models:/{MODEL}/latest, 1 replica (2 CPUs), batches up to 32, {os.cpu_count()} "
              f"cores; up in {up:.1f} s; {args.requests} requests per level, {len(payloads)} distinct splat files")
        print(f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        results = {}
        for clients in LEVELS:
            r = results[clients] = level(url, payloads, clients, args.requests)
            print(f"{clients:>7} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['errors']:>6}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(f"\n{'bytes per image':<24} {'images':>6} {'size':>5} {'splats':>7} {'PNG':>7} {'JPEG q90':>8} "
          f"{'splats/JPEG':>11}")
    digits = sizes(tests, sorted((root / "data").glob("test-*.tar")))
    rows = [("held-out digits", digits)]
    photos = sorted((root / "splats" / "photos").glob("*.tar"))
    if photos:
        rows.append(("photos", sizes(photos, sorted((root / "data").glob("photos-*.tar")))))
    for name, b in rows:
        print(f"{name:<24} {b['n']:>6} {b['size']:>5} {b['splat']:>7.0f} {b['png']:>7.0f} {b['jpeg']:>8.0f} "
              f"{b['splat'] / b['jpeg']:>11.2f}")
    top = results[LEVELS[-1]]
    print(f"serve: {top['rps']:.0f} req/s at {LEVELS[-1]} clients, p99 {top['p99']:.0f} ms; splat bytes / JPEG bytes "
          f"{digits['splat'] / digits['jpeg']:.2f}")


if __name__ == "__main__":
    main()
