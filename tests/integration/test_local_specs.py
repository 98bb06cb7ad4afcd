"""The shipped one-machine specs, run as a user runs them: fit -> train-rgb -> train -> evaluate
from an empty directory, the example digits written on first use (shrunk with --set to keep the
test short; the specs themselves are unchanged)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def job(cwd: Path, script: str, *args: str, spec: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPLATCLIP_EXAMPLES": str(cwd / "examples")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(JOBS / script), *([str(JOBS / "specs" / spec)] if spec else []),
           *[f"--set={a}" for a in args]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)


def test_local_specs_chain_from_an_empty_directory(tmp_path):
    fit = job(tmp_path, "fit.py", "input=examples://digits/{train-00000,test-00000}.tar", "fit.iterations=5",
              "fit.compile=false")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs/splats/digits").glob("*.tar")) == ["test-00000.tar",
                                                                                          "train-00000.tar"]
    small = ["data=outputs/splats/digits/train-00000.tar", "images=examples://digits/train-00000.tar",
             "stages.0.epochs=1", "stages.1.epochs=1"]
    early = job(tmp_path, "train.py", *small)  # before the RGB model exists: a clear error, before Ray starts
    assert early.returncode == 2
    assert "pretrained weights outputs/train/rgb-teacher-local/open_clip.pt: no such file" in early.stderr

    rgb = job(tmp_path, "train.py", "data=examples://digits/train-00000.tar", "stages.0.epochs=1",
              spec="train-rgb.local.yaml")
    assert rgb.returncode == 0, rgb.stderr[-3000:]
    splat = job(tmp_path, "train.py", *small)
    assert splat.returncode == 0, splat.stderr[-3000:]
    model = torch.load(tmp_path / "outputs/train/splat-encoder-local/model.pt", weights_only=True)
    assert model["step"] == 6  # 500 digits over 2 workers at 64: 3 steps an epoch, 1 + 1 epochs
    assert model["model"]["pretrained"] == str(tmp_path / "outputs/train/rgb-teacher-local/open_clip.pt")
    fitted = json.loads((tmp_path / "outputs/splats/digits/_fit.json").read_text())["settings"]["fit"]
    assert model["fit"] == fitted and fitted["gaussians"] == 49  # how its training splats were fitted

    ev = job(tmp_path, "evaluate.py")
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "outputs/eval/digits.json").read_text())
    assert result["splat"]["images"] == result["rgb"]["images"] == 500
    assert 0 <= result["ratio_top1"] and result["compression"]["ratio_raw"] == pytest.approx(3.0)
    assert "splat / rgb top-1" in ev.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # the specs' default tracking URI, in the cwd
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "splatclip-local"]
    local = client.get_experiment_by_name("splatclip-local")
    assert local.artifact_location.startswith(str(tmp_path))  # beside the jobs, not in a worker's directory
    everything = client.search_runs([local.experiment_id])
    (parent,) = [r for r in everything if r.data.tags.get("splatclip.group") == "true"]
    jobs = [r for r in everything if r is not parent]  # the chain's four runs, under the one parent
    assert sorted(r.data.tags["splatclip.job"] for r in jobs) == ["evaluate", "fit", "train", "train"]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert parent.info.run_name == "local-chain" and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in jobs)
    (evaluation,) = [r for r in jobs if r.data.tags["splatclip.job"] == "evaluate"]
    assert [a.path for a in client.list_artifacts(evaluation.info.run_id)] == ["digits.json"]
    (registered,) = client.search_model_versions("name = 'splat-encoder-local'")  # what serve.local.yaml serves
    (encoder,) = [r for r in jobs if r.info.run_id == registered.run_id]
    assert encoder.data.tags["splatclip.job"] == "train" and registered.version == 1
    mlmodel = yaml.safe_load(Path(client.download_artifacts(registered.run_id, "encoder/MLmodel", str(tmp_path))).read_text())
    assert mlmodel["metadata"] == {"fit": fitted}  # the registered model carries them for a client
