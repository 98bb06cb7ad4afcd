"""Ray runtime helpers on a real local Ray."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

from splatclip.platform.runtime import actor_request, init_ray, local_cpus, pool_size, ray_options
from splatclip.platform.specs import RaySpec

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


class Double:
    def __call__(self, batch):
        return {"x": batch["id"] * 2}


def test_actor_pool_with_fractional_cpus_does_not_starve_reads(ray_local):
    spec = RaySpec(actors=2, cpus_per_actor=0.5)
    ctx = init_ray(spec)  # already initialized: returns the running context
    assert ctx is not None
    lo, hi = pool_size(spec)
    ds = ray_local.data.range(64, override_num_blocks=8).map_batches(
        Double, compute=ray_local.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=8, **ray_options(actor_request(spec)),
    )
    assert sorted(int(r["x"]) for r in ds.take_all()) == [2 * i for i in range(64)]


def test_resource_helpers():
    assert local_cpus(RaySpec()) == max(2, os.cpu_count())  # one 0.5-CPU actor and a read task
    assert local_cpus(RaySpec(actors=2, max_actors=6, cpus_per_actor=1)) >= 7  # the pool and a read task
    assert local_cpus(RaySpec(num_cpus=3)) == 3
    assert ray_options(actor_request(RaySpec(cpus_per_actor=0.25, gpus_per_actor=1))) == {"num_cpus": 0.25,
                                                                                          "num_gpus": 1}
    assert ray_options({"CPU": 4, "GPU": 1, "fit_node": 0.001, "memory": 5}) == {
        "num_cpus": 4, "num_gpus": 1, "memory": 5, "resources": {"fit_node": 0.001}}
    assert pool_size(RaySpec(actors=2, max_actors=8)) == (2, 8)
    assert np.isclose(ray_options(actor_request(RaySpec()))["num_cpus"], 0.5)


LOCAL_RAY_KNOWS_ITSELF = """
import os, ray
from splatclip.platform.runtime import init_ray
from splatclip.platform.specs import RaySpec

init_ray(RaySpec())

@ray.remote
def state_api_from_a_worker():  # as Ray Train's placement-group cleaner reaches it: no address given
    from ray.util.state import list_nodes
    return os.environ.get("RAY_ADDRESS"), [n.node_ip for n in list_nodes()]

print(ray.get_runtime_context().gcs_address, *ray.get(state_api_from_a_worker.remote()), os.environ.get("RAY_ADDRESS"))
"""


def test_a_local_ray_tells_its_processes_its_own_address():
    """Without this, a worker's state API finds another cluster on this machine (the `ray start` of a
    test or a user, or its stale address file) and Ray Train's cleaner thread fails."""
    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY_KNOWS_ITSELF], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gcs, worker_address, nodes, driver_address = proc.stdout.split(maxsplit=3)
    assert gcs.startswith("127.0.0.1:") and worker_address == gcs
    assert nodes == "['127.0.0.1']" and driver_address.strip() == "None"  # the driver's environment is restored


TWO_AT_ONCE = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():  # both processes leave the barrier together
    time.sleep(0.01)
import ray
from splatclip.platform.runtime import init_ray
from splatclip.platform.specs import RaySpec
init_ray(RaySpec(num_cpus=1))
print(ray.get(ray.remote(lambda: 'ran').remote()), ray.get_runtime_context().gcs_address)
"""


def test_two_local_jobs_started_at_the_same_moment_both_run(tmp_path):
    """Each starts its own Ray on 127.0.0.1 (dashboard, GCS): neither may fail on a port the other took."""
    for round_ in range(2):
        go = tmp_path / f"go-{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", TWO_AT_ONCE, str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(3)  # both have imported Python and wait at the barrier
        go.touch()
        outs = [p.communicate(timeout=900) for p in procs]
        for proc, (out, err) in zip(procs, outs):
            assert proc.returncode == 0, err[-3000:]
        addresses = [out.split()[1] for out, _ in outs]
        assert all(out.startswith("ran ") for out, _ in outs) and addresses[0] != addresses[1]
