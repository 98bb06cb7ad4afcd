"""`cluster.yaml` run on one machine: a Ray head on 127.0.0.1 whose autoscaler launches the file's
own node types as local raylets (Ray's fake multi-node provider), to try the cluster before paying
for it (`splatclip cluster up` / `down`, README "Try it on one machine").

The node types keep `cluster.yaml`'s resources (CPU, GPU, fit_node, train_node): they are logical
numbers that cost nothing here and decide what the autoscaler launches. GPUs are logical too: the
jobs see no CUDA device on these nodes and compute on the CPU. Each node gets a small object store
(the machine's memory is shared by every node). Everything lives in one directory: the generated
autoscaler config, Ray's session files and `cluster.json` (address, dashboard, the head's process
ids, Ray's short session directory under /tmp), and `down` ends every process of that session, by
process id.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from splatclip.platform.runtime import free_port

log = logging.getLogger(__name__)
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's node type, and its id:
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
# Ray's own provider for tests, named as an external module (its `fake_multinode` type loads a
# defaults file the pip wheel lacks)
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
NODE_OBJECT_STORE = 100 << 20  # bytes of object store per local node
STATE = "cluster.json"


@dataclass
class LocalCluster:
    directory: str
    address: str  # the GCS, host:port (RAY_ADDRESS for drivers on this machine)
    dashboard: str  # http://127.0.0.1:PORT (`ray job submit --address`)
    config: str  # the autoscaler config it runs
    tmpdir: str  # Ray's session files (short: Ray's socket paths must fit in 107 bytes)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to join this cluster, `ray job submit` included."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard, "RAY_TMPDIR": self.tmpdir,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": token_path(self.directory), "SPLATCLIP_AUTOSCALER_CONFIG": self.config}

    def token(self) -> str:
        return Path(token_path(self.directory)).read_text().strip()


def token_path(directory: str) -> str:
    """The cluster's own Ray token (token authentication, as on the cloud cluster), readable by its
    owner only; never printed."""
    return str(Path(directory).resolve() / "auth_token")


def fake_config(cluster_yaml: dict, gcs_address: str, idle_minutes: float) -> dict:
    """The autoscaler config of a local cluster: `cluster.yaml`'s node types (resources, min and max
    workers), its head renamed to the provider's head type, every cloud setting dropped."""
    types = {}
    head = cluster_yaml["head_node_type"]
    for name, node in cluster_yaml["available_node_types"].items():
        resources = dict(node.get("resources", {}))
        if name == head:
            types[HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        resources["object_store_memory"] = NODE_OBJECT_STORE
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node.get("min_workers", 0),
                       "max_workers": node.get("max_workers", 1)}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {"cluster_name": cluster_yaml.get("cluster_name", "local"), "max_workers": cluster_yaml["max_workers"],
            "upscaling_speed": cluster_yaml.get("upscaling_speed", 1.0), "idle_timeout_minutes": idle_minutes,
            "provider": {"type": "external", "module": PROVIDER, "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "launch_multiple": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": HEAD_TYPE, "auth": {}, "docker": {},
            "file_mounts": {}, "file_mounts_sync_continuously": False, **{key: [] for key in empty}}


def up(cluster_yaml: str, directory: str, idle_minutes: float = 0.1, timeout: float = 120.0) -> LocalCluster:
    """Start the head of a local cluster in `directory` (which must not hold a running one). Worker
    nodes come and go with the jobs' requests."""
    root = Path(directory).resolve()
    if (root / STATE).exists():
        raise RuntimeError(f"{root / STATE} exists: a local cluster may run there (`splatclip cluster down "
                           f"{directory}` first)")
    root.mkdir(parents=True, exist_ok=True)
    port, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    source = yaml.safe_load(Path(cluster_yaml).read_text())
    config = fake_config(source, address, idle_minutes)
    config_path = root / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    head = config["available_node_types"][HEAD_TYPE]["resources"]
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
           f"--object-store-memory={NODE_OBJECT_STORE}", f"--autoscaling-config={config_path}",
           "--disable-usage-stats"]
    cluster = LocalCluster(str(root), address, f"http://127.0.0.1:{dashboard}", str(config_path),
                           tempfile.mkdtemp(prefix="splatclip-cluster-"))
    fd = os.open(token_path(str(root)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    env = {**os.environ, **cluster.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # autoscaler v2 (it publishes the node types to the cluster); the head is the provider's
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in a job: this environment's
    # RAY_ADDRESS stays: every process of the cluster inherits its own cluster's address (Ray Train's
    # placement group cleaner would otherwise pick whichever Ray on this machine started last)
    env.pop("RAY_AUTH_TOKEN", None)  # the cluster's token is its file's
    (root / STATE).write_text(json.dumps(asdict(cluster), indent=1))
    with open(root / "ray-start.log", "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        down(str(root))
        raise RuntimeError(f"ray start failed ({done.returncode}); see {root / 'ray-start.log'}")
    wait_dashboard(cluster.dashboard, cluster.token(), timeout)
    log.info("local cluster up: RAY_ADDRESS=%s, dashboard %s", cluster.address, cluster.dashboard)
    return cluster


def wait_dashboard(url: str, token: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while True:
        try:
            urllib.request.urlopen(request, timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local cluster's dashboard {url} did not answer in {timeout:.0f} s")
            time.sleep(0.5)


def load(directory: str) -> LocalCluster:
    return LocalCluster(**json.loads((Path(directory).resolve() / STATE).read_text()))


def processes(directory: str) -> list[int]:
    """Ids of the processes of the local cluster in `directory` (none when none runs there)."""
    state = Path(directory).resolve() / STATE
    return session_processes(load(directory).tmpdir) if state.exists() else []


def session_processes(tmpdir: str) -> list[int]:
    """Ids of every process whose command line or environment names a Ray session directory
    (raylets, GCS, agents, workers, the autoscaler and the nodes it started)."""
    tmp = tmpdir.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tmp in (entry / "cmdline").read_bytes() or tmp in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def down(directory: str, grace: float = 3.0) -> int:
    """End every process of the local cluster in `directory` (TERM, then KILL after `grace` s),
    remove its Ray session files and forget it. Returns how many processes there were."""
    pids = processes(directory)
    left = pids
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.2)
        left = [p for p in left if alive(p)]
        if not left:
            break
    state = Path(directory).resolve() / STATE
    if state.exists():
        shutil.rmtree(load(directory).tmpdir, ignore_errors=True)
        state.unlink()
    return len(pids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def type_of(resources: dict, config: dict) -> str:
    """The node type of a node of this cluster, by its logical resources (CPU, GPU, markers)."""

    def logical(res: dict) -> dict:
        return {k: float(v) for k, v in res.items()
                if not k.startswith("node:") and k not in ("memory", "object_store_memory") and float(v)}

    mine = logical(resources)
    for name, node in config["available_node_types"].items():
        if logical(node.get("resources", {})) == mine:
            return name
    return "unknown"


def nodes(cluster: LocalCluster) -> list[dict]:
    """Every node the cluster has had, alive or dead: {id, state (ALIVE, DEAD), type}."""
    cmd = [str(Path(sys.executable).parent / "ray"), "list", "nodes", "--detail", "--format", "json",
           "--limit", "10000", "--address", cluster.dashboard]
    done = subprocess.run(cmd, env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"ray list nodes failed: {done.stderr[-500:]}")
    config = yaml.safe_load(Path(cluster.config).read_text())
    return [{"id": n["node_id"], "state": n["state"], "type": type_of(n["resources_total"], config)}
            for n in json.loads(done.stdout)]


def kill_node(node_id: str) -> int:
    """Lose a node the way a reclaimed spot instance does: SIGKILL to all of its processes (raylet,
    agents, workers; the fake provider starts them with the node's id in their environment), object
    store and all. Returns how many there were."""
    mark = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def submit(cluster: LocalCluster, script: str, args: list[str]) -> subprocess.Popen:
    """`ray job submit` of a job script (its path: the nodes share this machine's disk and Python,
    so nothing is uploaded) to the cluster's job API; the Popen tails the job's log until it ends
    (stdout, stderr merged) and exits with the job's status."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard, "--",
           "python", str(Path(script).resolve()), *args]
    return subprocess.Popen(cmd, env={**os.environ, **cluster.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def alive_workers(cluster: LocalCluster, node_type: str | None = None) -> list[str]:
    """Ids of the worker nodes alive now (of one type, or all)."""
    return [n["id"] for n in nodes(cluster)
            if n["state"] == "ALIVE" and n["type"] != HEAD_TYPE and node_type in (None, n["type"])]
