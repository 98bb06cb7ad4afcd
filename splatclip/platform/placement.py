"""What a job asks of a cluster, checked against what the cluster can ever offer, before anything
waits on it.

Ray never refuses a request no node can meet: the task or actor stays pending ("No available node
types can fulfill...") and Ray Train retries its start without end. A job here first reads the
cluster's node types (the autoscaler's config where there is one, else the nodes alive now), then:

- drops from each request the node markers (`fit_node`, `train_node`: custom resources that steer
  the autoscaler to a node type) that no node type offers, so one spec runs on a laptop too;
- refuses (exit 2, one line) a request no node type can hold: the resource, the amount asked and
  what each node type offers;
- refuses a local path for what every node reads or writes when the cluster has more than one
  node, unless the spec says the path is a shared filesystem.

Pure functions of dicts; `cluster_node_types` is the one that asks Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STANDARD = ("CPU", "GPU")  # what every node type has (0 where it says nothing)
MEASURED = ("memory", "object_store_memory")  # a node measures these at start: unknown in a config that omits them


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_nodes: int  # how many there can be (the head: 1)


def config_node_types(config: dict) -> list[NodeType]:
    """The node types of an autoscaler config (`cluster.yaml`, or what `ray up` put on the head),
    the head's included; a worker type with max_workers 0 can never exist and is left out."""
    head = config.get("head_node_type")
    out = []
    for name, node in config.get("available_node_types", {}).items():
        count = 1 if name == head else int(node.get("max_workers", 0))
        if count > 0:
            out.append(NodeType(name, {k: float(v) for k, v in (node.get("resources") or {}).items()}, count))
    return out


def live_node_types(nodes: list[dict]) -> list[NodeType]:
    """Node types from `ray.nodes()`: each distinct set of resources of the nodes alive now."""
    seen: dict[tuple, NodeType] = {}
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = {k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
        key = tuple(sorted(res.items()))
        if key in seen:
            seen[key] = NodeType(seen[key].name, res, seen[key].max_nodes + 1)
        else:
            seen[key] = NodeType(f"node {node.get('NodeManagerAddress', '?')}#{len(seen) + 1}", res, 1)
    return list(seen.values())


def autoscaler_config_path(spec_value: str | None) -> str | None:
    """The autoscaler config to read: the spec's, else $SPLATCLIP_AUTOSCALER_CONFIG (a local cluster
    sets it), else the one `ray up` writes on a cluster's head, when it exists."""
    for candidate in (spec_value, os.environ.get("SPLATCLIP_AUTOSCALER_CONFIG"), "~/ray_bootstrap_config.yaml"):
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    return None


def fmt(resources: dict[str, float]) -> str:
    """{CPU 8, GPU 1, fit_node 1}; memory in GiB (a node type's object store is left out)."""
    shown = [f"{k} {v / 2**30:g} GiB" if k == "memory" else f"{k} {v:g}"
             for k, v in sorted(resources.items()) if k != "object_store_memory"]
    return "{" + ", ".join(shown) + "}"


def fit_request(what: str, request: dict[str, float], types: list[NodeType],
                count: int = 1) -> tuple[dict[str, float], str | None]:
    """(the request without node markers no type offers, a problem line or None). `what` names the
    request ("a fitting actor"), `count` how many must run at once (an actor pool's minimum, Ray
    Train's workers); amounts of 0 ask for nothing."""
    request = {k: v for k, v in request.items() if v > 0}
    offered = {k for t in types for k in t.resources}
    request = {k: v for k, v in request.items() if k in STANDARD or k in MEASURED or k in offered}

    def holds(t: NodeType, key: str, amount: float) -> bool:
        if key in MEASURED and key not in t.resources:
            return True
        return t.resources.get(key, 0.0) >= amount

    if any(all(holds(t, k, v) for k, v in request.items()) for t in types):
        fits = {t.name: t.max_nodes * per_node(t, request) for t in types}
        if sum(fits.values()) >= count:
            return request, None
        held = "; ".join(f"{name} {n}" for name, n in fits.items() if n)
        return request, (f"ray: {count} x {what} ({fmt(request)} each) must run at once, and the cluster's node "
                         f"types hold at most {sum(fits.values())} ({held}, at their max_workers)")
    offers = "; ".join(f"{t.name} {fmt(t.resources)} lacks {', '.join(k for k, v in request.items() if not holds(t, k, v))}"
                       for t in types) or "there are no node types"
    return request, f"ray: {what} asks {fmt(request)}, and no node type can hold it: {offers}"


def per_node(t: NodeType, request: dict[str, float]) -> int:
    """How many of a request one node of a type holds."""
    counts = [int(t.resources.get(k, 0.0) / v + 1e-9) for k, v in request.items() if k in t.resources or k not in MEASURED]
    return min(counts, default=1_000_000)


def multi_node(types: list[NodeType]) -> bool:
    return sum(t.max_nodes for t in types) > 1


def local_path_problems(paths: dict[str, str], types: list[NodeType], shared: bool) -> list[str]:
    """One line per local path (field -> URL) when the cluster has more than one node: each node
    would read or write its own disk (and a spot node's disk goes with it)."""
    if shared or not multi_node(types):
        return []
    local = {f: u for f, u in paths.items() if "://" not in u or u.startswith("sqlite:///")}
    return [f"{field}: {url} is a local path, and this cluster has more than one node: each would read or write "
            "its own disk. Use object storage (s3://...), or set storage.shared_filesystem: true when the path "
            "is on a filesystem every node mounts" for field, url in local.items()]


def cluster_node_types(spec_config: str | None) -> tuple[list[NodeType], str]:
    """(node types, where they came from) of the Ray cluster this process is connected to."""
    import ray
    import yaml

    path = autoscaler_config_path(spec_config)
    if path:
        return config_node_types(yaml.safe_load(Path(path).read_text())), f"the autoscaler config {path}"
    return live_node_types(ray.nodes()), "the nodes alive now"
