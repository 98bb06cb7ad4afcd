"""The jobs' resource requests against cluster.yaml's node types: what the autoscaler launches for
them, requests no node type can hold, local paths on a cluster of several nodes."""

from functools import partial
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

from splatclip.fit.job import DECODE_TASK, FitJob
from splatclip.platform import placement
from splatclip.platform.runtime import actor_request
from splatclip.platform.specs import FitSpec, RaySpec, TrainSpec
from splatclip.train.job import TrainJob

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
TYPES = placement.config_node_types(CLUSTER)
GPU_FIT = {"cpus_per_actor": 4, "gpus_per_actor": 1}


def launched(request: dict, count: int) -> dict:
    """What Ray's autoscaler (its bin packing, as `ray up` runs it) launches from nothing for `count`
    pending copies of a request on cluster.yaml's node types."""
    scorer = partial(_default_utilization_scorer, node_availability_summary=None)
    nodes, left = get_nodes_for(CLUSTER["available_node_types"], {}, CLUSTER["head_node_type"],
                                CLUSTER["max_workers"], [request] * count, scorer)
    assert not left
    return dict(nodes)


def test_node_types_of_cluster_yaml():
    by_name = {t.name: t for t in TYPES}
    assert set(by_name) == {"head", "fit_gpu", "decode_cpu", "train_gpu"}
    assert by_name["fit_gpu"].resources == {"CPU": 8, "GPU": 1, "fit_node": 1}
    assert (by_name["head"].max_nodes, by_name["fit_gpu"].max_nodes) == (1, 32)
    assert placement.multi_node(TYPES)


def test_fitting_actors_launch_fit_nodes_only():
    bare = {"CPU": 4.0, "GPU": 1.0}
    assert launched(bare, 8) == {"train_gpu": 1}  # what a request without the marker gets: the p5 node
    actor = actor_request(FitSpec(input="x", output="y", ray=GPU_FIT).ray)
    assert actor["fit_node"] > 0
    for count in (1, 8, 32):
        assert launched(actor, count) == {"fit_gpu": count}
    worker = actor_request(TrainSpec(data="x", ray={"actors": 8, "cpus_per_actor": 8, "gpus_per_actor": 1}).ray)
    assert launched(worker, 8) == {"train_gpu": 1}
    assert launched(worker, 16) == {"train_gpu": 2}
    decode, problem = placement.fit_request("a decode task", DECODE_TASK, TYPES)
    assert problem is None and "GPU" not in decode


def test_impossible_requests_name_resource_amount_and_node_types():
    for request, lacks in (({"CPU": 4, "GPU": 2, "fit_node": 0.001}, "fit_gpu {CPU 8, GPU 1, fit_node 1} lacks GPU;"),
                           ({"CPU": 200, "GPU": 1, "train_node": 0.001},
                            "train_gpu {CPU 96, GPU 8, train_node 1} lacks CPU"),
                           ({"CPU": 1, "fit_node": 2}, "fit_gpu {CPU 8, GPU 1, fit_node 1} lacks fit_node;")):
        kept, problem = placement.fit_request("a fitting actor", request, TYPES)
        assert kept == request
        assert problem.startswith(f"ray: a fitting actor asks {placement.fmt(request)}, and no node type can hold it")
        assert lacks in problem and "decode_cpu {CPU 16} lacks" in problem
    ok, problem = placement.fit_request("a fitting actor", {"CPU": 8, "GPU": 1, "fit_node": 1}, TYPES)
    assert problem is None


def test_more_actors_than_the_node_types_can_ever_hold():
    actor = {"CPU": 4, "GPU": 1, "fit_node": 0.001}
    assert placement.fit_request("a fitting actor", actor, TYPES, 32)[1] is None  # 32 fit_gpu nodes
    _, problem = placement.fit_request("a fitting actor", actor, TYPES, 33)
    assert problem == ("ray: 33 x a fitting actor ({CPU 4, GPU 1, fit_node 0.001} each) must run at once, and the "
                       "cluster's node types hold at most 32 (fit_gpu 32, at their max_workers)")
    worker = {"CPU": 8, "GPU": 1, "train_node": 0.001}
    assert placement.fit_request("a training worker", worker, TYPES, 32)[1] is None  # 4 nodes x 8 GPUs
    assert "hold at most 32 (train_gpu 32" in placement.fit_request("a training worker", worker, TYPES, 40)[1]
    laptop = [placement.NodeType("laptop", {"CPU": 4.0}, 1)]
    assert placement.fit_request("a decode task", {"CPU": 0.5, "memory": 1 << 30}, laptop, 8)[1] is None


def test_markers_no_node_type_offers_are_dropped():
    laptop = [placement.NodeType("laptop", {"CPU": 8.0, "GPU": 0.0}, 1)]
    kept, problem = placement.fit_request("a fitting actor", {"CPU": 0.5, "GPU": 0, "fit_node": 0.001}, laptop)
    assert (kept, problem) == ({"CPU": 0.5}, None)
    kept, problem = placement.fit_request("a fitting actor", {"CPU": 0.5, "GPU": 1, "fit_node": 0.001}, laptop)
    assert problem.endswith("laptop {CPU 8, GPU 0} lacks GPU")
    # memory is measured at a node's start: a config that omits it does not refuse a request for it
    assert placement.fit_request("a decode task", DECODE_TASK, laptop)[1] is None


def test_live_nodes_grouped_by_resources():
    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0, "node:10.0.0.1": 1.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0, "node:10.0.0.2": 1.0}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0}}]
    types = placement.live_node_types(nodes)
    assert [(t.resources, t.max_nodes) for t in types] == [({"CPU": 8.0}, 2)]
    assert placement.multi_node(types)


@pytest.mark.parametrize("shared", [False, True])
def test_local_paths_on_several_nodes(shared):
    paths = {"input": "/data/{0..3}.tar", "output": "s3://b/out", "tracking.uri": "sqlite:///mlflow.db"}
    problems = placement.local_path_problems(paths, TYPES, shared)
    if shared:
        assert problems == []
    else:
        assert [p.split(":")[0] for p in problems] == ["input", "tracking.uri"]
        assert "more than one node" in problems[0] and "shared_filesystem" in problems[0]
    one = [placement.NodeType("laptop", {"CPU": 8.0}, 1)]
    assert placement.local_path_problems(paths, one, shared) == []


def test_jobs_name_their_requests_and_paths(tmp_path):
    fit = FitJob(FitSpec(input="s3://b/in/{0..1}.tar", output=str(tmp_path), ray=GPU_FIT))
    assert fit.requests()["a fitting actor"] == ({"CPU": 4, "GPU": 1, "fit_node": 0.001}, 1)
    assert fit.cluster_paths() == {"input": "s3://b/in/{0..1}.tar", "output": str(tmp_path)}
    train = TrainJob(TrainSpec(data="s3://b/s/{0..1}.tar", storage_path="s3://b/runs",
                               tracking={"uri": "http://127.0.0.1:5000"}, model={"pretrained": "openai"}))
    assert train.requests()["a training worker"] == ({"CPU": 0.5, "GPU": 0.0, "train_node": 0.001}, 1)
    assert train.cluster_paths() == {"data": "s3://b/s/{0..1}.tar", "storage_path": "s3://b/runs"}


def test_resources_are_custom_ones():
    with pytest.raises(ValueError, match="custom resources only"):
        RaySpec(resources={"GPU": 1})
    with pytest.raises(ValueError, match="above 0"):
        RaySpec(resources={"fit_node": 0})
