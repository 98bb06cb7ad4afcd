"""Ray runtime helpers: join the cluster `ray job submit` points at, or start a local one."""

from __future__ import annotations

import logging
import os

from splatclip.platform.specs import RaySpec

log = logging.getLogger(__name__)


def local_cpus(spec: RaySpec) -> int:
    """Logical CPUs for a local Ray. Declaring at least 4 keeps a pool of actors from taking every
    CPU the read tasks need (seen: two 1-CPU actors on a 2-CPU Ray deadlock the read stage)."""
    return spec.num_cpus or max(4, os.cpu_count() or 1)


def keep_on_loopback() -> None:
    """Make a local Ray listen on 127.0.0.1 only, not on the machine's network address. Ray takes
    the loopback address when its cluster mode is off (the switch it uses on macOS/Windows)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(spec: RaySpec):
    """Connect to RAY_ADDRESS (set by `ray job submit`) or spec.address ("auto" joins the cluster
    `ray start` runs on this machine); else start a local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS") or spec.address
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address)
    else:
        keep_on_loopback()
        cpus = local_cpus(spec)
        log.info("starting a local Ray with %d logical CPUs", cpus)
        # address="local": always a fresh instance, never a stale `ray start` cluster file
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    return ray.get_runtime_context()


def actor_options(spec: RaySpec) -> dict:
    """Resources for one actor of a pool: one GPU each on a cluster, a fraction of a CPU here."""
    opts = {"num_cpus": spec.cpus_per_actor}
    if spec.gpus_per_actor:
        opts["num_gpus"] = spec.gpus_per_actor
    return opts


def pool_size(spec: RaySpec) -> tuple[int, int]:
    """(min, max) actors of an autoscaling pool."""
    return spec.actors, max(spec.actors, spec.max_actors or spec.actors)
