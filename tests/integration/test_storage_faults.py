"""Storage that fails: the fault proxy in front of moto (`faulty_s3`), the retry policy that covers
it, and what is left when retries run out."""

import os

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError

from faulty_s3 import KINDS, Fault, FaultProxy, bucket_name
from splatclip.platform import storage
from splatclip.platform.lease import Lease, LeaseHeld
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.specs import StorageSpec

pytestmark = pytest.mark.integration


@pytest.fixture
def faulty(s3_endpoint, fault_proxy, request):
    """(bucket URL, StorageSpec through the proxy, proxy): a fresh bucket of the test's own name
    (its faults the same in every run), made without faults."""
    name = bucket_name(request.node.nodeid)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}", StorageSpec(endpoint_url=fault_proxy.url, region="us-east-1"), fault_proxy


def raw_client(url):
    """boto3 without retries: each request is one attempt, so the proxy's answer is seen as it is."""
    config = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1})
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=config)


def test_the_proxy_injects_what_it_is_told_and_counts_it(faulty):
    bucket, _, proxy = faulty
    client, name = raw_client(proxy.url), bucket.removeprefix("s3://")
    proxy.set(Fault("slowdown", 1.0, method="PUT", key=r"/parts/"))
    client.put_object(Bucket=name, Key="shards/a", Body=b"x")  # not a part: forwarded
    with pytest.raises(ClientError, match="SlowDown"):
        client.put_object(Bucket=name, Key="parts/a", Body=b"x")
    assert client.get_object(Bucket=name, Key="shards/a")["Body"].read() == b"x"
    assert proxy.injected == {"slowdown": 1} and proxy.requests == {"PUT": 2, "GET": 1}
    proxy.set(Fault("error500", 1.0, method="GET"))
    with pytest.raises(ClientError, match="InternalError"):
        client.get_object(Bucket=name, Key="shards/a")
    assert proxy.injected == {"error500": 1}


def test_the_same_seed_fails_the_same_requests(s3_endpoint):
    """Decisions depend on the request and how often it was asked, not on arrival order."""
    requests = [(m, f"/b/k{i % 7}") for i in range(200) for m in ("GET", "PUT")]
    runs = []
    for order in (requests, requests[::-1]):
        proxy = FaultProxy(s3_endpoint, seed=3)
        proxy.set(Fault("slowdown", 0.2), Fault("truncate", 0.1))
        decided = {}
        for m, t in order:
            decided.setdefault((m, t), []).append(getattr(proxy.decide(m, t), "kind", None))
        proxy.close()
        runs.append(decided)
    assert runs[0] == runs[1]
    kinds = [k for v in runs[0].values() for k in v]
    assert 40 < kinds.count("slowdown") < 120 and 10 < kinds.count("truncate") < 70


@pytest.mark.parametrize("kind", KINDS)
def test_the_retry_policy_covers_each_fault(faulty, kind):
    """With 20% of every request failing in one way, every storage operation the jobs use gives the
    right answer, and the proxy shows the faults happened. (A request fails for good at 0.2^5: the
    test's bucket name is fixed, so its draws are the same in every run.)"""
    bucket, spec, proxy = faulty
    proxy.set(Fault(kind, 0.2, seconds=0.05))
    for i in range(5):
        data = os.urandom(3000 + i)
        url = f"{bucket}/objects/{i}.bin"
        storage.write_bytes(url, data, spec)
        assert storage.read_bytes(url, spec) == data
        with storage.open_read(url, spec) as f:
            assert f.read(100) + f.read() == data
        assert storage.exists(url, spec)
    assert storage.listdir(f"{bucket}/objects", spec) == [f"{i}.bin" for i in range(5)]
    found, missing = storage.list_shards(f"{bucket}/objects/{{0..5}}.bin", spec)
    assert len(found) == 5 and missing == [f"{bucket}/objects/5.bin"]
    storage.remove(f"{bucket}/objects/0.bin", spec)
    assert not storage.exists(f"{bucket}/objects/0.bin", spec)
    assert proxy.injected[kind] >= 3, proxy.injected


def test_an_outage_ends_a_call_after_its_budget_naming_operation_and_url(faulty):
    bucket, spec, proxy = faulty
    spec = spec.model_copy(update={"max_attempts": 3, "call_attempts": 2})
    storage.write_bytes(f"{bucket}/here.bin", b"kept", spec)
    proxy.set(Fault("slowdown", 1.0))
    with pytest.raises(storage.StorageError, match=rf"^write {bucket}/new.bin: .*reduce your request rate"):
        storage.write_bytes(f"{bucket}/new.bin", b"lost", spec)
    assert proxy.requests == {"PUT": 6}  # call_attempts x max_attempts, and not one more
    proxy.set(Fault("reset_before", 1.0))
    with pytest.raises(storage.StorageError, match=rf"^read {bucket}/here.bin: .*Could not connect"):
        storage.read_bytes(f"{bucket}/here.bin", spec)
    assert proxy.requests == {"HEAD": 6}  # s3fs asks the size first
    proxy.set()
    assert storage.read_bytes(f"{bucket}/here.bin", spec) == b"kept"
    assert not storage.exists(f"{bucket}/new.bin", spec)


def test_a_body_cut_short_is_a_storage_error_never_short_data(faulty):
    """Every GET answered with half its body, and no retry left: the read fails; a shard read is
    not mistaken for a damaged (truncated) shard, which the fit job would record and skip."""
    bucket, spec, proxy = faulty
    spec = spec.model_copy(update={"call_attempts": 1})
    url = f"{bucket}/shard.tar"
    with write_shard(url, spec) as w:
        for i in range(20):
            w.write({"__key__": f"{i:04d}", "bin": os.urandom(5000)})
    proxy.set(Fault("truncate", 1.0, method="GET"))
    with pytest.raises(storage.StorageError, match=rf"^(read|open) {url}: "):
        storage.read_bytes(url, spec)
    with pytest.raises(storage.StorageError, match=rf"^(read|open) {url}: "):
        list(read_samples(url, spec))
    assert proxy.injected["truncate"] >= 2
    proxy.set()
    assert len(list(read_samples(url, spec))) == 20


def test_a_write_is_checked_against_what_storage_holds(faulty, monkeypatch):
    """An upload that storage reports done but holds other bytes than were written is an error (a
    part's record is written after its tar, so such a tar never gets one)."""
    bucket, spec, _ = faulty
    import s3fs

    real = s3fs.S3FileSystem.info

    def short_info(self, path, **kw):
        out = real(self, path, **kw)
        return {**out, "size": out["size"] - 1} if path.endswith("odd.bin") else out

    monkeypatch.setattr(s3fs.S3FileSystem, "info", short_info)
    with pytest.raises(storage.StorageError, match="storage holds 99 bytes of the 100 written"):
        storage.write_bytes(f"{bucket}/odd.bin", b"x" * 100, spec)


def test_a_full_disk_names_the_path_and_keeps_what_was_written(tmp_path):
    """A local write that meets ENOSPC: a StorageError saying "no space", no file and no temporary
    left behind, the files written before it intact (a tmpfs of 1 MiB; root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        storage.write_bytes(str(disk / "first.bin"), b"a" * 200_000)
        with pytest.raises(storage.StorageError, match=rf"^write {disk}/second.bin: no space left on device"):
            storage.write_bytes(str(disk / "second.bin"), b"b" * 2_000_000)
        assert sorted(os.listdir(disk)) == ["first.bin"]
        assert (disk / "first.bin").read_bytes() == b"a" * 200_000
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_admits_one_job_and_frees_itself_when_its_holder_is_gone(faulty, tmp_path, where):
    bucket, spec, proxy = faulty
    directory = str(tmp_path / "out") if where == "local" else f"{bucket}/out"
    first = Lease(directory, spec, "fit", ttl=600)
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"held by the fit job started .* \(pid \d+\), renewed \d+ s ago"):
        Lease(directory, spec, "fit", ttl=600).acquire()
    first.release()
    second = Lease(directory, spec, "train", ttl=600)
    second.acquire()  # released: free at once
    second._stop.set()  # the holder dies: no more renewals, its process gone
    second.record["pid"] = 2**22 + 1  # above Linux's pid_max: no such process
    second._swap(second.version)
    Lease(directory, spec, "fit", ttl=600).acquire()  # taken over at once: the holder ran here and is gone


def test_a_lease_taken_under_faults_is_taken_once(faulty):
    """Conditional writes retried after a reset that hid their success: the job still knows the
    lease is its own, and a second job still finds it held."""
    bucket, spec, proxy = faulty
    proxy.set(Fault("reset_after", 0.5, method="PUT"))
    leases = [Lease(f"{bucket}/out{i}", spec, "fit", ttl=600) for i in range(6)]
    for lease in leases:
        lease.acquire()
        with pytest.raises(LeaseHeld):
            Lease(lease.url.rsplit("/", 1)[0], spec, "fit", ttl=600).acquire()
    assert proxy.injected["reset_after"] >= 2
    proxy.set()
    for lease in leases:
        lease.release()
        assert not storage.exists(lease.url, spec)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_jobs_starting_at_the_same_moment_get_one_lease(faulty, tmp_path, where):
    import threading

    bucket, spec, _ = faulty
    directory = str(tmp_path / "out") if where == "local" else f"{bucket}/out"
    start, won, refused = threading.Barrier(4), [], []

    def take():
        lease = Lease(directory, spec, "fit", ttl=600)
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as err:
            refused.append(str(err))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    won[0].release()
