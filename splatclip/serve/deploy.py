"""The serve job: check the spec, start or join Ray, deploy the application, and (on a Ray of its
own) keep serving until interrupted.

On a cluster (RAY_ADDRESS, as `ray job submit` sets it, or `ray.address`) the job deploys and exits:
the application stays up on the cluster until `serve delete NAME` or `serve shutdown`. Started
alone, the job starts a local Ray, serves until SIGINT or SIGTERM, then shuts Serve down.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading

from splatclip.platform import placement, storage
from splatclip.platform.runtime import actor_request, init_ray, joins_cluster, node_types
from splatclip.platform.secrets import redact
from splatclip.platform.specs import ServeSpec
from splatclip.platform.tracking import absolute_uri

log = logging.getLogger(__name__)

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+|latest)|@(?P<alias>[A-Za-z0-9_-]+))$")


def absolute(spec: ServeSpec) -> ServeSpec:
    """Relative local paths (a model.pt, a sqlite registry) made absolute: replicas run elsewhere."""
    model = spec.model
    if "://" not in model and not model.startswith("models:/"):
        model = os.path.abspath(model)
    tracking = spec.tracking.model_copy(update={"uri": absolute_uri(spec.tracking.uri)})
    return spec.model_copy(update={"model": model, "tracking": tracking})


def model_problem(spec: ServeSpec) -> str | None:
    """Why `spec.model` cannot be loaded, or None."""
    if not spec.model.startswith("models:/"):
        return None if storage.exists(spec.model, spec.storage) else \
            f"model {redact(spec.model)}: no such model file (a train run writes model.pt in its directory)"
    match = MODEL_URI.match(spec.model)
    if not match:
        return f"model {spec.model}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.tracking.uri, registry_uri=spec.tracking.uri)
    name, version, alias = match.group("name", "version", "alias")
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            if not client.search_model_versions(f"name = '{name}'", max_results=1):
                raise MlflowException(f"no versions of {name}")
        else:
            client.get_model_version(name, version)
    except MlflowException as err:
        return f"model {spec.model}: not in the registry at {redact(spec.tracking.uri)} ({redact(str(err))[:200]})"
    return None


def run(spec: ServeSpec) -> int:
    from ray import serve

    from splatclip.serve.app import build_app

    spec = absolute(spec)
    problem = model_problem(spec)
    if problem:
        log.error("%s", problem)
        return 2
    joining = joins_cluster(spec.ray)
    types, _ = node_types(spec.ray)
    init_ray(spec.ray)
    request, problem = placement.fit_request("a serve replica", actor_request(spec.ray), types, spec.ray.actors)
    if problem:
        log.error("%s", problem)
        return 2
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build_app(spec, request), name=spec.name, route_prefix=spec.route)
    url = f"http://{spec.host}:{spec.port}{spec.route}"
    print(f"serving {spec.model} at {url}", flush=True)
    if joining:
        print(f"the application stays on the cluster: `serve delete {spec.name}` ends it", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    print("stopped serving", flush=True)
    return 0
