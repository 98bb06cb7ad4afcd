"""Shared fixtures: real servers on loopback (moto S3, MLflow) and one local Ray per session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
import urllib.request
from pathlib import Path

import pytest
import torch

from faulty_s3 import FaultProxy, bucket_name, start_moto
from splatclip.platform.runtime import free_port

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray started by the tests stays on 127.0.0.1
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on a CPU machine. Triton reads this when it is first
    # used (torch.compile touches it too), so it is set before any test runs.
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# Modules whose tests fork processes from the test process (DataLoader workers): run first, so that a
# worker forks before any in-process Ray (the session's `ray_local`) has started its threads. Forked
# with a live Ray driver in the process, a loader child once died of "double free or corruption".
FORK_FIRST = ("test_ingest.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FORK_FIRST)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path, headers: dict | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def kill_job():
    """Kill a job process started with `start_new_session=True` the way a lost machine would: it and
    every process of its session. Ray's workers and actors run in process groups of their own, so
    killing the job's group alone leaves them running (and writing) after their driver is gone."""

    def kill(proc: subprocess.Popen) -> None:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        proc.communicate(timeout=30)  # reaped: a zombie would still count as a process of the session
        for _ in range(150):  # again while any is left (one may fork as they die); 30 s at most
            left = subprocess.run(["pgrep", "-a", "-s", str(proc.pid)], capture_output=True, text=True).stdout
            if not left:
                break
            subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
            time.sleep(0.2)
        assert not left, f"processes of the killed job still run:\n{left}"

    return kill


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port, with throwaway credentials in the environment."""
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        stop(proc)


@pytest.fixture
def fault_proxy(s3_endpoint):
    """The fault-injecting proxy (`faulty_s3`) in front of moto, no faults set; closed after the test."""
    proxy = FaultProxy(s3_endpoint, seed=0)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; returns (s3://bucket, StorageSpec pointing at moto)."""
    import boto3

    from splatclip.platform.specs import StorageSpec

    name = bucket_name(request.node.nodeid)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}", StorageSpec(endpoint_url=s3_endpoint, region="us-east-1")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and served artifacts, on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, 600, log)
        yield uri
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (4 logical CPUs on this 2-core machine)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A Ray head started with `ray start --head --block` on loopback, with its dashboard (the job
    API) and token authentication. Returns (dashboard URL, environment for `ray job submit`).
    Stopped by its process id."""
    root = tmp_path_factory.mktemp("ray-head")
    port, dash = free_port(), free_port()
    log = root / "head.log"
    token = uuid.uuid4().hex
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "4",
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--disable-usage-stats",
           # fixed defaults (52365 ...) would collide with the in-process Ray of `ray_local`
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd=root)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{url}/api/version", proc, 600, log, {"Authorization": f"Bearer {token}"})
        deadline = time.time() + 600  # the job agent comes up after the dashboard: probe until it takes a job
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--", "true"],
                                   env=env, capture_output=True, text=True, cwd=root)
            if probe.returncode == 0:
                break
            if time.time() > deadline:
                raise RuntimeError(f"the Ray job API never accepted a job:\n{probe.stdout[-2000:]}{probe.stderr[-2000:]}")
            time.sleep(2)
        yield url, env
    finally:
        stop(proc)
        # `ray start` records its address for later `ray` commands; `ray stop` would remove it, a
        # stop by process id does not, and a stale one misleads every Ray tool on this machine
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()
