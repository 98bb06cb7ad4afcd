"""cluster.yaml against the autoscaler's own JSON schema, shipped inside the ray package."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_ray_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # raises ValidationError naming the bad field
    validate_config(prepare_config(config))  # the launcher's own check, after filling its defaults
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu_types) == 2 and all(t["min_workers"] < t["max_workers"] for t in gpu_types)
    assert not types["decode_cpu"]["resources"].get("GPU")  # the fit job's read and decode tasks
    assert any("constraints.txt" in c for c in config["setup_commands"])
    # token authentication on every node, with the token copied from the launching machine
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts if "ray start" in c)
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
