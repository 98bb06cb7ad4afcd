"""Ray runtime helpers: join the cluster `ray job submit` points at, or start a local one."""

from __future__ import annotations

import logging
import math
import os
import socket

from splatclip.platform import placement
from splatclip.platform.placement import NodeType
from splatclip.platform.specs import RaySpec

log = logging.getLogger(__name__)


def local_cpus(spec: RaySpec) -> int:
    """Logical CPUs for a local Ray: the machine's cores, and at least the actor pool's CPUs plus one
    for the tasks that feed it (a pool that took every CPU would starve its reads: seen with two
    1-CPU actors on a 2-CPU Ray). Declaring more than that oversubscribes the cores: on 2 cores
    the fit job ran 1.4x slower with 4 (Ray starts a worker process for each task it may run at
    once, and those start-ups crowd out the fitting actor's)."""
    pool = math.ceil((spec.max_actors or spec.actors) * spec.cpus_per_actor)
    return spec.num_cpus or max(os.cpu_count() or 1, pool + 1)


def keep_on_loopback() -> None:
    """Make a local Ray listen on 127.0.0.1 only, not on the machine's network address. Ray takes
    the loopback address when its cluster mode is off (the switch it uses on macOS/Windows)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(spec: RaySpec, log_to_driver: bool = True):
    """Connect to RAY_ADDRESS (set by `ray job submit`) or spec.address ("auto" joins the cluster
    `ray start` runs on this machine); else start a local Ray on 127.0.0.1. Without
    `log_to_driver` the workers' output stays in Ray's log files (the session's logs folder)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS") or spec.address
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        start_local(local_cpus(spec), log_to_driver)
    return ray.get_runtime_context()


START_ATTEMPTS = 3  # a port another process takes between our choice and Ray's bind costs one more try


def start_local(cpus: int, log_to_driver: bool = True) -> None:
    """A fresh local Ray on 127.0.0.1 with its dashboard (the state API). Its processes are told
    their own cluster's address (RAY_ADDRESS, with the GCS on a port chosen here): Ray Train's
    placement-group cleaner looks its controller up through the state API, and without the address
    it would find another cluster's (a `ray start` on this machine, or its stale address file).

    Two jobs may start at the same moment on one machine: the dashboard takes 8265 or the next free
    port as it binds (Ray tries 50; a port checked free here could be taken before Ray binds it), and
    a start that fails on a port taken meanwhile is retried with fresh ports."""
    import ray

    keep_on_loopback()
    log.info("starting a local Ray with %d logical CPUs", cpus)
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
        try:
            # address="local": always a fresh instance, never one of `ray start`
            ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=log_to_driver)
            return
        except Exception as err:  # Ray raises several types for a port it could not bind
            ray.shutdown()
            if attempt == START_ATTEMPTS:
                raise
            log.warning("local Ray did not start (%s: %s); retrying with other ports", type(err).__name__,
                        str(err)[:200])
        finally:  # the processes Ray started keep them; this one must not join that address again later
            del os.environ["RAY_GCS_SERVER_PORT"], os.environ["RAY_ADDRESS"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actor_request(spec: RaySpec) -> dict[str, float]:
    """What one actor of a pool (a fitting actor, a training worker) asks for: a GPU each and its
    node type's marker on a cluster, a fraction of a CPU here."""
    return {"CPU": spec.cpus_per_actor, "GPU": spec.gpus_per_actor, **spec.resources}


def ray_options(request: dict[str, float]) -> dict:
    """Ray's task and actor options (num_cpus, num_gpus, memory, resources) of a request."""
    opts = {"num_cpus": request.get("CPU", 0.0)}
    if request.get("GPU"):
        opts["num_gpus"] = request["GPU"]
    if request.get("memory"):
        opts["memory"] = request["memory"]
    custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        opts["resources"] = custom
    return opts


def joins_cluster(spec: RaySpec) -> bool:
    """Whether init_ray joins a running cluster (else it starts a local Ray of one node)."""
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS") or spec.address)


def local_node_type(spec: RaySpec) -> NodeType:
    """The one node of the local Ray that init_ray starts: its logical CPUs, and the GPUs Ray finds."""
    import torch

    return NodeType("this machine (a local Ray)", {"CPU": float(local_cpus(spec)),
                                                   "GPU": float(torch.cuda.device_count())}, 1)


def pool_size(spec: RaySpec) -> tuple[int, int]:
    """(min, max) actors of an autoscaling pool."""
    return spec.actors, max(spec.actors, spec.max_actors or spec.actors)


def node_types(spec: RaySpec) -> tuple[list[NodeType], str]:
    """(the node types a job's requests must fit, where they came from): the cluster's, joined here,
    or the one node of the local Ray the job will start."""
    if joins_cluster(spec):
        init_ray(spec)
        return placement.cluster_node_types(spec.autoscaler_config)
    return [local_node_type(spec)], "the local Ray this job starts"
