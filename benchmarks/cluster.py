"""The fit and train jobs on cluster.yaml's node types, on this machine: a local cluster
(`splatclip.platform.local_cluster`: Ray's fake multi-node autoscaler, GPUs logical, the jobs
computing on the CPU) with moto's S3 for storage, every job sent with `ray job submit`.

Runs, one after another, each from zero worker nodes:
  fit            the 8 example photos (4 shards), 2 fitting actors with a GPU each
  fit, lost node the same into another output, a fit node killed (its whole process tree) while
                 its actor fits a batch (the batch's claim names the node)
  train          a tiny ViT on the fitted splats, 2 workers with a GPU each, checkpoints every 2
                 steps; its train node killed after the first checkpoint
For each: the nodes launched by type, seconds from submit to the first fitted image (the first
part written) or the first checkpoint, seconds from the job's end until no worker node is left
(idle timeout 6 s), and what the lost node cost (batches refitted, steps redone).
"""

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from faulty_s3 import start_moto  # noqa: E402

from splatclip import datasets  # noqa: E402
from splatclip.platform import local_cluster  # noqa: E402

FIT = ["fit.gaussians=16", "fit.iterations=300", "fit.size=32", "fit.coarse=0", "fit.compile=false", "batch_size=1",
       "tracking.enabled=false", "storage.region=us-east-1", "ray.actors=2", "ray.cpus_per_actor=1",
       "ray.gpus_per_actor=1"]
SHARDS = "photos-{00000..00003}.tar"


class Bucket:
    def __init__(self, endpoint: str):
        self.name = f"bench-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.client.create_bucket(Bucket=self.name)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def fitting_node(self, prefix: str) -> str | None:
        """The node of an actor fitting a batch now: its claim written, its part not."""
        keys = self.keys(prefix)
        for key in keys:
            if key.endswith(".claim") and key.removesuffix(".claim") + ".json" not in keys:
                return json.loads(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())["node"]
        return None

    def shards(self, prefix: str) -> dict[str, bytes]:
        return {k: self.client.get_object(Bucket=self.name, Key=k)["Body"].read()
                for k in self.keys(prefix) if k.endswith(".tar") and "/_parts/" not in k}


def until(check, timeout: float):
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def run_job(cluster, script: str, args: list[str], first, victim=None) -> dict:
    """Submit, note when `first()` holds, kill the node `victim()` names once it names one, wait for
    the end, then for the worker nodes to go."""
    before = {n["id"] for n in local_cluster.nodes(cluster)}
    start = time.monotonic()
    proc = local_cluster.submit(cluster, script, args)
    row = {"first": None, "killed": None}
    deadline = start + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if row["first"] is None and first():
            row["first"] = time.monotonic() - start
        if victim is not None and row["killed"] is None and (node := victim()):
            local_cluster.kill_node(node)
            row["killed"] = node
        if row["first"] is not None and (victim is None or row["killed"]):
            break
        time.sleep(0.1)
    log, _ = proc.communicate(timeout=1800)
    ended = time.monotonic()
    until(lambda: not local_cluster.alive_workers(cluster), 300)
    row.update(status=proc.returncode, log=log, seconds=ended - start, to_zero=time.monotonic() - ended)
    counts: dict[str, int] = {}
    for node in local_cluster.nodes(cluster):
        if node["id"] not in before:
            counts[node["type"]] = counts.get(node["type"], 0) + 1
    row["nodes"] = counts
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto, endpoint = start_moto(tmp / "moto.log")
    cluster = None
    try:
        bucket = Bucket(endpoint)
        datasets.write_shards(datasets.photos(), str(tmp / "src"), "photos", 2)
        for shard in sorted((tmp / "src").glob("*.tar")):
            bucket.client.put_object(Bucket=bucket.name, Key=f"src/{shard.name}", Body=shard.read_bytes())
        cluster = local_cluster.up(str(ROOT / "cluster.yaml"), str(tmp / "cluster"), idle_minutes=0.1)
        s3 = f"s3://{bucket.name}"
        fit_script = str(ROOT / "jobs" / "fit.py")

        def fit_args(out: str) -> list[str]:
            return [f"--set={a}" for a in [f"input={s3}/src/{SHARDS}", f"output={s3}/{out}",
                                           f"storage.endpoint_url={endpoint}", *FIT]]

        def part_written(out):
            return lambda: [k for k in bucket.keys(f"{out}/_parts/") if k.endswith(".json")]

        rows = {"fit": run_job(cluster, fit_script, fit_args("clean"), part_written("clean"))}
        rows["fit, lost node"] = run_job(cluster, fit_script, fit_args("lost"), part_written("lost"),
                                         lambda: bucket.fitting_node("lost/_parts/"))
        clean, lost = bucket.shards("clean/"), bucket.shards("lost/")
        identical = len(clean) == 4 and {k.split("/", 1)[1]: v for k, v in clean.items()} == {
            k.split("/", 1)[1]: v for k, v in lost.items()}

        epochs, samples, workers, batch = 6, 8, 2, 2
        planned = epochs * samples // (workers * batch)
        spec = {"data": f"{s3}/clean/{SHARDS}", "storage_path": f"{s3}/runs", "name": "bench",
                "model": {"name": str(ROOT / "tests" / "data" / "tiny-vit.json"), "latents": 8, "resampler_layers": 1,
                          "resampler_width": 32, "fourier_bands": 4},
                "stages": [{"kind": "contrastive", "epochs": epochs, "lr": 0.001}], "batch_size": batch,
                "checkpoint_every": 2, "max_failures": 3, "loader_workers": 0,
                "ray": {"actors": workers, "cpus_per_actor": 1, "gpus_per_actor": 1}, "tracking": {"enabled": False},
                "storage": {"endpoint_url": endpoint, "region": "us-east-1"}}
        (tmp / "train.yaml").write_text(yaml.safe_dump(spec))
        checkpoint = lambda: [k for k in bucket.keys("runs/bench/") if k.endswith("checkpoint_manager_snapshot.json")]  # noqa: E731
        train_node = lambda: checkpoint() and (local_cluster.alive_workers(cluster, "train_gpu") or [None])[0]  # noqa: E731
        rows["train, lost node"] = run_job(cluster, str(ROOT / "jobs" / "train.py"), [str(tmp / "train.yaml")],
                                           checkpoint, train_node)
        done = 0
        if "runs/bench/model.pt" in bucket.keys("runs/bench/"):
            body = bucket.client.get_object(Bucket=bucket.name, Key="runs/bench/model.pt")["Body"].read()
            done = torch.load(io.BytesIO(body), weights_only=True)["step"]
    finally:
        if cluster is not None:
            local_cluster.down(cluster.directory)
        moto.terminate()

    print(f"\nlocal cluster from cluster.yaml (idle timeout 6 s), {os.cpu_count()} cores")
    print(f"{'job':<18} {'exit':>4} {'nodes launched':<34} {'first (s)':>9} {'job (s)':>8} {'to zero (s)':>11} "
          f"{'lost node cost':<18}")
    for name, row in rows.items():
        nodes = ", ".join(f"{t} {c}" for t, c in sorted(row["nodes"].items())) or "none"
        first = f"{row['first']:.1f}" if row["first"] is not None else "-"
        if name.startswith("fit, lost"):
            cost = f"{row['log'].split('batches_refitted')[1].split()[0]} batches refitted" \
                if "batches_refitted" in row["log"] else "-"
        elif name.startswith("train"):
            resumed = [line.rsplit("step", 1)[1].strip() for line in row["log"].splitlines() if "resumes at step" in line]
            cost = f"resumed at step {resumed[0]}" if resumed else "not resumed"
        else:
            cost = "-"
        print(f"{name:<18} {row['status']:>4} {nodes:<34} {first:>9} {row['seconds']:>8.1f} {row['to_zero']:>11.1f} "
              f"{cost:<18}")
    print("first: submit to the first fitted image written (fit) or the first checkpoint (train)")
    fit_nodes = rows["fit"]["nodes"]
    print(f"nodes fit_gpu {fit_nodes.get('fit_gpu', 0)} train_gpu {fit_nodes.get('train_gpu', 0)} "
          f"decode_cpu {fit_nodes.get('decode_cpu', 0)}; lost-node fit identical: {'yes' if identical else 'no'}; "
          f"lost-node train steps: {planned} planned, {done} done")


if __name__ == "__main__":
    main()
