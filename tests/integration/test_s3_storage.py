"""Storage and shards against moto's S3 server on loopback."""

import os

import pytest

from splatclip.platform import storage
from splatclip.platform.shards import read_samples, write_shard

pytestmark = pytest.mark.integration


def test_write_list_read_commit(s3_bucket):
    bucket, spec = s3_bucket
    for i in range(3):
        storage.write_bytes(f"{bucket}/shards/{i:05d}.tar", f"shard {i}".encode(), spec)
    found, missing = storage.list_shards(f"{bucket}/shards/{{00000..00003}}.tar", spec)
    assert found == [f"{bucket}/shards/{i:05d}.tar" for i in range(3)]
    assert missing == [f"{bucket}/shards/00003.tar"]
    assert storage.read_bytes(f"{bucket}/shards/00001.tar", spec) == b"shard 1"
    globbed, _ = storage.list_shards(f"{bucket}/shards/*.tar", spec)
    assert globbed == found
    storage.mark_success(f"{bucket}/shards", {"count": 3}, spec)
    assert storage.read_success(f"{bucket}/shards", spec) == {"count": 3}


@pytest.mark.parametrize("size", [1024, 12 * 2**20], ids=["small", "multipart"])
def test_failed_upload_leaves_nothing(s3_bucket, size):
    bucket, spec = s3_bucket
    url = f"{bucket}/partial-{size}.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(url, spec) as f:
            f.write(os.urandom(size))
            f.flush()  # a multipart upload has started sending parts
            raise RuntimeError("worker died")
    assert not storage.exists(url, spec)
    fs, path = storage.filesystem(url, spec)
    assert fs.ls(bucket.removeprefix("s3://"), refresh=True) == []


def test_webdataset_shard_roundtrip_on_s3(s3_bucket):
    bucket, spec = s3_bucket
    url = f"{bucket}/wds/00000.tar"
    with write_shard(url, spec) as w:
        for i in range(5):
            w.write({"__key__": f"{i:04d}", "txt": f"caption {i}".encode(), "cls": str(i % 2).encode()})
    samples = list(read_samples(url, spec))
    assert [s["__key__"] for s in samples] == [f"{i:04d}" for i in range(5)]
    assert samples[3]["txt"] == b"caption 3" and samples[3]["cls"] == b"1"


def test_credentials_from_spec_are_used(s3_endpoint):
    from splatclip.platform.specs import StorageSpec

    spec = StorageSpec(endpoint_url=s3_endpoint, access_key_id="AKIDEXAMPLE", secret_access_key="s3cr3t")
    opts = storage.storage_options("s3://b/k", spec)
    assert opts["key"] == "AKIDEXAMPLE" and opts["secret"] == "s3cr3t"
    assert opts["client_kwargs"]["endpoint_url"] == s3_endpoint
