"""The fit job on S3 that fails: moto on loopback behind the fault proxy of the tests
(`tests/faulty_s3.py`), 1,000 digits in 4 shards, the demo's digit fit settings (no teacher).

Runs, one after another in one process and one local Ray: no faults; 5% and 20% of requests failing
(the share split evenly over 503 SlowDown, 500 InternalError, a reset before the request, a reset
after it, a body cut short); then an outage (every request refused) from the moment the job
writes its first part. For each: wall time, requests seen, faults injected, whether the shards are
byte-identical to the clean run's, and the exit status. Requests retried = faults injected: each
injected fault costs one more attempt of that request.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from faulty_s3 import Fault, FaultProxy, start_moto  # noqa: E402

from splatclip import datasets  # noqa: E402
from splatclip.fit.job import run  # noqa: E402
from splatclip.platform import storage  # noqa: E402
from splatclip.platform.loader import load_spec  # noqa: E402
from splatclip.platform.runtime import init_ray  # noqa: E402
from splatclip.platform.specs import FitSpec, RaySpec, StorageSpec  # noqa: E402

KINDS = ("slowdown", "error500", "reset_before", "reset_after", "truncate")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--digits", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="storage-faults-"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto, endpoint = start_moto(tmp / "moto.log")
    proxy = FaultProxy(endpoint, seed=0)
    try:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        per_shard = -(-args.digits // args.shards)
        datasets.write_shards(datasets.digits("train", limit=args.digits), str(tmp / "src"), "digits", per_shard)
        for shard in sorted((tmp / "src").glob("*.tar")):
            client.put_object(Bucket=bucket, Key=f"src/{shard.name}", Body=shard.read_bytes())
        init_ray(RaySpec(num_cpus=3))
        src = f"s3://{bucket}/src/digits-{{00000..{args.shards - 1:05d}}}.tar"

        def fit(out: str, *extra: str) -> tuple[int, float]:
            spec = load_spec(FitSpec, None, [
                f"input={src}", f"output=s3://{bucket}/{out}", "tracking.enabled=false", f"batch_size={per_shard}",
                "fit.gaussians=49", "fit.iterations=40", "fit.size=28", "fit.lr_color=0.02", "ray.actors=1",
                "ray.cpus_per_actor=1.0", f"storage.endpoint_url={proxy.url}", "storage.region=us-east-1", *extra])
            start = time.perf_counter()
            status = run(spec)
            return status, time.perf_counter() - start

        def shards(out: str) -> dict[str, bytes]:
            spec = StorageSpec(endpoint_url=endpoint, region="us-east-1")
            base = f"s3://{bucket}/{out}"
            return {n: storage.read_bytes(f"{base}/{n}", spec) for n in storage.listdir(base, spec) if n.endswith(".tar")}

        rows = []
        for share in (0.0, 0.05, 0.20):
            proxy.set(*[Fault(kind, share / len(KINDS)) for kind in KINDS] if share else ())
            out = f"out-{int(share * 100)}"
            status, seconds = fit(out)
            requests, injected = sum(proxy.requests.values()), sum(proxy.injected.values())
            rows.append((share, status, seconds, requests, injected, dict(proxy.injected), out))
        clean = shards(rows[0][6])
        print(f"fit job: {args.digits} digits in {args.shards} shards on S3 (moto behind the fault proxy), 49 "
              "Gaussians, 40 iterations, 1 actor, 2 cores; faults split evenly over " + ", ".join(KINDS))
        print(f"{'faults':>7} {'exit':>4} {'wall s':>7} {'requests':>8} {'retried':>7} {'identical':>9}  injected")
        summary = {}
        for share, status, seconds, requests, injected, kinds, out in rows:
            identical = "yes" if status == 0 and shards(out) == clean and len(clean) == args.shards else "no"
            summary[share] = (identical, injected)
            print(f"{share:>7.0%} {status:>4} {seconds:>7.1f} {requests:>8} {injected:>7} {identical:>9}  {kinds}")

        # an outage from the first part on: every write under _parts/ refused, whatever is retried
        proxy.set(Fault("error500", 1.0, method="PUT", key="/_parts/"))
        status, seconds = fit("out-outage")
        print(f"outage (every part write answered 500, default retry budget): exit {status} in {seconds:.1f} s, "
              f"{sum(proxy.requests.values())} requests")
        proxy.set()
        rerun, rerun_seconds = fit("out-outage")
        print(f"rerun with storage back: exit {rerun} in {rerun_seconds:.1f} s, identical "
              f"{'yes' if shards('out-outage') == clean else 'no'}")
        print(f"faults 5%: identical {summary[0.05][0]}, retried {summary[0.05][1]}; faults 20%: identical "
              f"{summary[0.2][0]}, retried {summary[0.2][1]}; outage: exit {status} in {seconds:.0f} s")
    finally:
        proxy.close()
        moto.terminate()
        moto.wait(timeout=30)


if __name__ == "__main__":
    main()
