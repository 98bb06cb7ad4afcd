"""cluster.yaml's node types run on this machine (Ray's fake multi-node autoscaler, `local_cluster`),
storage on moto's S3 as on a real cluster, jobs sent with `ray job submit`: the autoscaler launches
fit nodes for the fit job and train nodes for the train job, requests no node type can meet exit 2,
lost nodes cost work, not results.

These start several raylets on a 2-core machine: one cluster for the module, each wait bounded,
every process the fixture started ended by its id."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow.tracking import MlflowClient

from faulty_s3 import bucket_name
from splatclip import datasets
from splatclip.fit.job import run as fit_locally
from splatclip.platform import local_cluster, storage
from splatclip.platform.loader import load_spec
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import FitSpec, StorageSpec

pytestmark = [pytest.mark.integration, pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = str(ROOT / "tests" / "data" / "tiny-vit.json")
SHARDS = "photos-{00000..00003}.tar"  # 4 shards of 2 photos
FIT = ["fit.gaussians=16", "fit.iterations=200", "fit.size=32", "fit.coarse=0", "fit.compile=false", "batch_size=1",
       "tracking.enabled=false", "storage.region=us-east-1"]
# Two fitting actors with a (logical) GPU each, as jobs/specs/fit.s3.yaml asks, and one CPU: torch's
# thread count follows it and changes the float sums, so the one-node run uses the same
GPU_ACTORS = ["ray.actors=2", "ray.cpus_per_actor=1", "ray.gpus_per_actor=1"]


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """A local cluster from cluster.yaml (idle nodes removed after 6 s). Ray's start can fail under
    load (a raylet killed by an agent start-up timeout, an open Ray issue): the start is retried once."""
    root = tmp_path_factory.mktemp("cluster")
    for attempt in (1, 2):
        directory = str(root / f"attempt{attempt}")
        try:
            started = local_cluster.up(str(ROOT / "cluster.yaml"), directory, idle_minutes=0.1)
            break
        except RuntimeError:
            local_cluster.down(directory)
            if attempt == 2:
                raise
    try:
        yield started
    finally:
        local_cluster.down(started.directory)
        assert local_cluster.session_processes(started.tmpdir) == []  # every process it started, ended


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    name = bucket_name("test_cluster")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    src = tmp_path_factory.mktemp("photos")
    datasets.write_shards(datasets.photos(), str(src), "photos", 2)
    for shard in sorted(src.glob("*.tar")):
        client.put_object(Bucket=name, Key=f"src/{shard.name}", Body=shard.read_bytes())
    return f"s3://{name}"


def submit(cluster, job: str, sets: list[str], spec: str | None = None):
    return local_cluster.submit(cluster, str(ROOT / "jobs" / job), [*([spec] if spec else []),
                                                                   *[f"--set={s}" for s in sets]])


def run_driver(cluster, job: str, sets: list[str], spec: str | None = None):
    """The job script run here as a driver that joins the cluster (RAY_ADDRESS)."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *([spec] if spec else []),
                           *[f"--set={s}" for s in sets]],
                          env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=300)


def train_spec(path: Path, data: str, runs: str, endpoint: str, tracking: str | None = None, **extra) -> str:
    """A train spec file: the tiny ViT from scratch, one contrastive stage on `data`."""
    spec = {"data": data, "storage_path": runs, "name": "lost",
            "model": {"name": TINY, "latents": 8, "resampler_layers": 1, "resampler_width": 32, "fourier_bands": 4},
            "stages": [{"kind": "contrastive", "epochs": 4, "lr": 0.001}], "batch_size": 4, "checkpoint_every": 2,
            "max_failures": 3, "loader_workers": 0,
            "ray": {"actors": 1, "cpus_per_actor": 1, "gpus_per_actor": 1},
            "tracking": {"uri": tracking, "experiment": "cluster"} if tracking else {"enabled": False},
            "storage": {"endpoint_url": endpoint, "region": "us-east-1"}, **extra}
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def wait_for(what: str, check, timeout: float, proc=None, every: float = 0.5):
    deadline = time.monotonic() + timeout  # bounds a hang only
    while not (found := check()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{proc.communicate()[0][-4000:]}")
        if time.monotonic() > deadline:
            out = ""
            if proc is not None:
                proc.kill()
                out = proc.communicate()[0][-6000:]
            raise AssertionError(f"no {what} within {timeout:.0f} s\n{out}")
        time.sleep(every)
    return found


def lose_node(proc, what: str, victim) -> tuple[str, str]:
    """Kill the node `victim()` names once it names one, while the submitted job runs; (the node, the
    job's log) once the job has ended with status 0."""
    try:
        node = wait_for(what, victim, 600, proc, every=0.1)
        assert local_cluster.kill_node(node) > 0
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-5000:]
    return node, log


def fitting_node(endpoint: str, url: str) -> str | None:
    """The Ray node of a fitting actor that holds a batch now: its claim is written, its part not."""
    keys = objects(endpoint, url)
    for key in keys:
        if key.endswith(".claim") and key.removesuffix(".claim") + ".json" not in keys:
            bucket, _, _ = url.removeprefix("s3://").partition("/")
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["node"]
    return None


def objects(endpoint: str, url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_requests_no_node_type_can_meet_exit_2_at_once(cluster, bucket, s3_endpoint, tmp_path):
    """Before any actor or trainer starts: one line naming the request and what each type offers. A
    local output on this several-node cluster exits 2 the same way."""
    src = f"{bucket}/src/{SHARDS}"
    two_gpus = run_driver(cluster, "fit.py", [f"input={src}", f"output={bucket}/never", *FIT, "ray.gpus_per_actor=2",
                                              f"storage.endpoint_url={s3_endpoint}"])
    assert two_gpus.returncode == 2, two_gpus.stderr[-3000:]
    assert ("a fitting actor asks {CPU 1, GPU 2, fit_node 0.001}, and no node type can hold it: "
            "ray.head.default {CPU 0} lacks CPU, GPU, fit_node; fit_gpu {") in two_gpus.stderr
    assert "fit_gpu {CPU 8, GPU 1, fit_node 1} lacks GPU; decode_cpu {CPU 16} lacks GPU, fit_node; " in two_gpus.stderr
    spec = train_spec(tmp_path / "train.yaml", src, f"{bucket}/runs", s3_endpoint)
    big = run_driver(cluster, "train.py", ["model.encoder=rgb", "ray.cpus_per_actor=128"], spec)
    assert big.returncode == 2, big.stderr[-3000:]
    assert "a training worker asks {CPU 128, GPU 1, train_node 0.001}" in big.stderr
    assert "train_gpu {CPU 96, GPU 8, train_node 1} lacks CPU" in big.stderr
    local = run_driver(cluster, "fit.py", [f"input={src}", "output=outputs/never", *FIT,
                                           f"storage.endpoint_url={s3_endpoint}"])
    assert local.returncode == 2
    assert "output: outputs/never is a local path, and this cluster has more than one node" in local.stderr
    assert not objects(s3_endpoint, f"{bucket}/never")
    assert local_cluster.alive_workers(cluster) == []  # nothing was launched for them


@pytest.fixture(scope="module")
def fitted(cluster, bucket, s3_endpoint, ray_local, tmp_path_factory):
    """The fit job from zero worker nodes, one of its fit nodes killed while it fits a batch;
    returns (submit's output, S3 output URL, the bytes of a clean one-node run of the same spec)."""
    reference = tmp_path_factory.mktemp("one-node")
    src = f"{bucket}/src/{SHARDS}"
    local_spec = ROOT / "jobs" / "specs" / "fit.local.yaml"  # what jobs/fit.py starts from
    assert fit_locally(load_spec(FitSpec, local_spec, [f"input={src}", f"output={reference}", *FIT,
                                                       "ray.cpus_per_actor=1", f"storage.endpoint_url={s3_endpoint}"])) == 0
    clean = {p.name: p.read_bytes() for p in sorted(reference.glob("*.tar"))}
    assert local_cluster.alive_workers(cluster) == []
    out = f"{bucket}/fitted"
    proc = submit(cluster, "fit.py", [f"input={src}", f"output={out}", *FIT, *GPU_ACTORS,
                                      f"storage.endpoint_url={s3_endpoint}"])
    victim, log = lose_node(proc, "a batch being fitted", lambda: fitting_node(s3_endpoint, out))
    return log, out, clean, victim


def test_fit_job_launches_fit_nodes_survives_losing_one_and_scales_back(cluster, fitted, s3_endpoint):
    log, out, clean, victim = fitted
    spec = StorageSpec(endpoint_url=s3_endpoint, region="us-east-1")
    shards = {n: storage.read_bytes(storage.join(out, n), spec) for n in storage.listdir(out, spec) if n.endswith(".tar")}
    assert shards == clean  # byte for byte what one node makes
    keys = [s["__key__"] for n in sorted(shards) for s in read_samples(storage.join(out, n), spec)]
    assert keys == datasets.PHOTOS  # every sample once
    assert not [k for k in objects(s3_endpoint, out) if "/_parts/" in k]
    refitted = int(log.split("batches_refitted")[1].split()[0])
    assert refitted >= 1, log[-3000:]  # the lost node's batches, sent again
    nodes = local_cluster.nodes(cluster)
    assert {n["type"] for n in nodes} <= {local_cluster.HEAD_TYPE, "fit_gpu", "decode_cpu"}
    assert [n["state"] for n in nodes if n["id"] == victim] == ["DEAD"]
    assert sum(n["type"] == "fit_gpu" for n in nodes) >= 3  # two for the pool, one in place of the lost one
    wait_for("scale back to zero", lambda: local_cluster.alive_workers(cluster) == [], 180)


def test_train_job_launches_train_nodes_and_restores_after_losing_one(cluster, fitted, bucket, s3_endpoint,
                                                                      mlflow_server, tmp_path):
    """A worker with a (logical) GPU: one train_gpu node. It is killed after the first
    checkpoint; Ray Train restores on the node the autoscaler launches in its place, finishes the
    planned steps, and the MLflow run has each step once."""
    _, out, _, _ = fitted
    before = {n["id"] for n in local_cluster.nodes(cluster)}
    runs = f"{bucket}/runs"
    spec = train_spec(tmp_path / "train.yaml", f"{out}/{SHARDS}", runs, s3_endpoint, mlflow_server)
    proc = submit(cluster, "train.py", [], spec=spec)
    checkpoint = lambda: [k for k in objects(s3_endpoint, f"{runs}/lost")  # noqa: E731
                          if k.endswith("checkpoint_manager_snapshot.json")]
    _, log = lose_node(proc, "a train node after a checkpoint",
                       lambda: checkpoint() and (local_cluster.alive_workers(cluster, "train_gpu") or [None])[0])
    assert "GPUs are logical only" in log  # the workers trained on the CPU
    new = [n for n in local_cluster.nodes(cluster) if n["id"] not in before]
    assert {n["type"] for n in new} == {"train_gpu"} and len(new) >= 2  # the first, and the one in its place
    planned = 4 * 8 // 4  # epochs x samples / batch
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss/contrastive")
    assert sorted(m.step for m in history) == list(range(1, planned + 1))  # every step, each once
    assert run.info.status == "FINISHED"
    model = storage.read_bytes(f"{runs}/lost/model.pt", StorageSpec(endpoint_url=s3_endpoint, region="us-east-1"))
    assert model
    resumed = [line for line in log.splitlines() if "resumes at step" in line]
    assert resumed, log[-3000:]
