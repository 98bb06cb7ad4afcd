"""The fit job against storage that fails: S3 through the fault proxy, a full local disk, two jobs
on one output."""

import logging
import os
import subprocess

import boto3
import pytest
from mlflow.tracking import MlflowClient

from faulty_s3 import Fault, bucket_name
from splatclip import datasets
from splatclip.fit.job import run
from splatclip.platform import storage
from splatclip.platform.loader import load_spec
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import FitSpec, StorageSpec

pytestmark = pytest.mark.integration
FAST = ["fit.gaussians=16", "fit.iterations=4", "fit.size=32", "fit.compile=false", "batch_size=1"]
FAULTS = [Fault(kind, 0.06, seconds=0.05) for kind in ("slowdown", "error500", "reset_before", "reset_after",
                                                       "truncate", "delay")]


def spec_for(src, out, endpoint, *extra):
    return load_spec(FitSpec, None, [f"input={src}", f"output={out}", "tracking.enabled=false", *FAST,
                                     f"storage.endpoint_url={endpoint}", "storage.region=us-east-1", *extra])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    src = tmp_path_factory.mktemp("photos")
    datasets.write_shards(datasets.photos()[:6], str(src), "photos", 3)  # 6 photos -> 2 shards
    return src


@pytest.fixture
def bucket(s3_endpoint, photos, request):
    """A fresh bucket of the test's own name, holding the photo shards under src/ (written without faults)."""
    name = bucket_name(request.node.nodeid)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    for shard in sorted(photos.glob("*.tar")):
        client.put_object(Bucket=name, Key=f"src/{shard.name}", Body=shard.read_bytes())
    return f"s3://{name}"


@pytest.fixture(scope="module")
def clean(ray_local, photos, tmp_path_factory):
    """{shard name: bytes} of a clean local run: shards are reproducible, so an S3 output made
    under faults must hold exactly these bytes."""
    out = tmp_path_factory.mktemp("clean")
    assert run(spec_for(f"{photos}/photos-{{00000..00001}}.tar", out, "")) == 0
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def shard_bytes(out: str, endpoint: str) -> dict[str, bytes]:
    spec = StorageSpec(endpoint_url=endpoint, region="us-east-1")
    return {name: storage.read_bytes(storage.join(out, name), spec)
            for name in storage.listdir(out, spec) if name.endswith(".tar")}


def test_faults_on_every_kind_of_request_leave_the_output_of_a_clean_run(ray_local, bucket, s3_endpoint,
                                                                          fault_proxy, clean):
    src = f"{bucket}/src/photos-{{00000..00001}}.tar"
    fault_proxy.set(*FAULTS)
    assert run(spec_for(src, f"{bucket}/faulty", fault_proxy.url, "ray.actors=2")) == 0
    assert set(fault_proxy.injected) == {f.kind for f in FAULTS}, fault_proxy.injected
    faulty = shard_bytes(f"{bucket}/faulty", s3_endpoint)
    assert sorted(clean) == ["photos-00000.tar", "photos-00001.tar"] and faulty == clean
    spec = StorageSpec(endpoint_url=s3_endpoint, region="us-east-1")
    keys = [s["__key__"] for name in faulty for s in read_samples(f"{bucket}/faulty/{name}", spec)]
    assert keys == datasets.PHOTOS[:6]  # every sample once
    assert not [p for p in storage.filesystem(bucket, spec)[0].find(bucket.removeprefix("s3://")) if "/_parts/" in p]


def test_an_outage_mid_job_fails_it_in_one_line_and_a_rerun_finishes_it(ray_local, bucket, s3_endpoint,
                                                                       fault_proxy, clean, tmp_path, caplog):
    """Every write of a part refused (storage down for writes once the job has started): exit 1, one
    error line naming the operation and the URL, the MLflow run FAILED, no shard visible; once
    storage is back the rerun completes with the clean run's bytes."""
    src = f"{bucket}/src/photos-{{00000..00001}}.tar"
    tracking = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.enabled=true", "tracking.experiment=outage"]
    fast_failing = ["storage.max_attempts=2", "storage.call_attempts=1"]
    fault_proxy.set(Fault("error500", 1.0, method="PUT", key=r"/_parts/"))
    with caplog.at_level(logging.ERROR):
        assert run(spec_for(src, f"{bucket}/out", fault_proxy.url, *tracking, *fast_failing)) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("splatclip")]
    assert len(lines) == 1 and lines[0].startswith(f"the fit job failed: storage: write {bucket}/out/_parts/"), lines
    assert "InternalError" in lines[0] and "testing" not in lines[0]
    assert fault_proxy.injected["error500"] >= 2
    assert shard_bytes(f"{bucket}/out", s3_endpoint) == {}
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("outage").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    fault_proxy.set()
    assert run(spec_for(src, f"{bucket}/out", fault_proxy.url, *tracking)) == 0
    assert shard_bytes(f"{bucket}/out", s3_endpoint) == clean


def test_storage_down_from_the_start_exits_1_naming_it(bucket, fault_proxy, caplog):
    fault_proxy.set(Fault("reset_before", 1.0))
    spec = spec_for(f"{bucket}/src/photos-{{00000..00001}}.tar", f"{bucket}/out", fault_proxy.url,
                    "storage.max_attempts=2", "storage.call_attempts=1")
    with caplog.at_level(logging.ERROR):
        assert run(spec) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [lines[0]] and lines[0].startswith(f"the fit job failed: storage: list {bucket}/src/photos-0000")
    # one lookup (s3fs's info: two HEADs), each tried max_attempts x call_attempts times, then the job stops
    assert sum(fault_proxy.requests.values()) <= 4, fault_proxy.requests


def test_a_full_disk_fails_the_job_and_the_rerun_completes_it(ray_local, photos, clean, tmp_path, caplog):
    """The output on a 48 KiB tmpfs: the job stops with exit 1 naming the path and "no space", no
    partial shard visible; with the space back (a bigger mount), the rerun ends with the bytes of a
    clean run. Root only (mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    src = f"{photos}/photos-{{00000..00001}}.tar"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], check=True)
    try:
        with caplog.at_level(logging.ERROR):
            assert run(spec_for(src, disk / "out", "")) == 1
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "no space" in r.getMessage()]
        assert lines and f"{disk}/out/" in lines[0], [r.getMessage() for r in caplog.records]
        tars = sorted(p.name for p in (disk / "out").glob("*.tar"))
        for name in tars:  # what is visible is whole
            assert (disk / "out" / name).read_bytes() == clean[name]
        assert not list((disk / "out").rglob(".*.part"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert run(spec_for(src, disk / "out", "")) == 0
        assert {p.name: p.read_bytes() for p in sorted((disk / "out").glob("*.tar"))} == clean
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_second_job_on_a_running_jobs_output_refuses_naming_it(photos, tmp_path, caplog):
    """The output's lease held as a running fit job holds it (this process, alive): a fit job on the
    output exits 2 at once naming it and writes nothing; with the lease released it runs. (Jobs
    starting at the same moment: test_storage_faults; a killed job's lease taken over by its
    rerun: test_fit_job's killed-job test.)"""
    from splatclip.platform.lease import Lease

    out = tmp_path / "out"
    first = Lease(str(out), StorageSpec(), "fit")
    first.acquire()
    try:
        with caplog.at_level(logging.ERROR):
            assert run(spec_for(f"{photos}/photos-{{00000..00001}}.tar", out, "")) == 2
        assert (f"another job is running on this output: {out}/_lease.json is held by the fit job started "
                in caplog.text) and f"(pid {os.getpid()})" in caplog.text
        assert sorted(p.name for p in out.iterdir()) == ["_lease.json"]  # nothing else written
    finally:
        first.release()
    assert not (out / "_lease.json").exists()
