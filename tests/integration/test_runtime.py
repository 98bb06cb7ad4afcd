"""Ray runtime helpers on a real local Ray."""

import sys

import numpy as np
import pytest
import ray

from splatclip.platform.runtime import actor_options, init_ray, local_cpus, pool_size
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
        batch_size=8, **actor_options(spec),
    )
    assert sorted(int(r["x"]) for r in ds.take_all()) == [2 * i for i in range(64)]


def test_resource_helpers():
    assert local_cpus(RaySpec()) >= 4
    assert actor_options(RaySpec(cpus_per_actor=0.25, gpus_per_actor=1)) == {"num_cpus": 0.25, "num_gpus": 1}
    assert pool_size(RaySpec(actors=2, max_actors=8)) == (2, 8)
    assert np.isclose(actor_options(RaySpec())["num_cpus"], 0.5)
