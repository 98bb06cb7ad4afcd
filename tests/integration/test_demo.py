"""`make demo` at a reduced size: every artifact exists, MLflow holds the metrics, and the final
table agrees with the JSON results."""

import json
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration


def test_demo_small(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    root = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "splatclip.demo", "--small", "--root", str(root)], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("contact_sheet.png", "rate_distortion.png", "training_curves.png"):
        assert (root / "pictures" / name).stat().st_size > 1000, name
    for path in ("runs/rgb-teacher/model.pt", "runs/rgb-teacher/open_clip.pt", "runs/splat-encoder/model.pt",
                 "eval.json", "results.json", "splats/train/_SUCCESS.json", "splats/photos/_summary.json"):
        assert (root / path).exists(), path

    results = json.loads((root / "results.json").read_text())
    evaluation = json.loads((root / "eval.json").read_text())
    assert results["accuracy_splat_top1"] == evaluation["splat"]["top1"]
    assert results["accuracy_rgb_top1"] == evaluation["rgb"]["top1"]
    assert results["ratio_raw"] == pytest.approx(2352 / 784)
    table = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S.*?)\s{2,}(\d+(?:\.\d+)?)\b", proc.stdout, re.M)}
    assert table["accuracy splats"] == pytest.approx(results["accuracy_splat_top1"], abs=5e-4)
    assert table["accuracy RGB (top-1)"] == pytest.approx(results["accuracy_rgb_top1"], abs=5e-4)
    assert table["bytes: splats"] == pytest.approx(results["splat_bytes"], abs=0.5)

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("splatclip-demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"rgb-teacher", "splat-encoder", "fit-digits-train", "fit-photos", "evaluate", "demo-summary"} <= set(runs)
    assert runs["demo-summary"].data.metrics["accuracy_ratio"] == pytest.approx(results["accuracy_ratio"])
    assert "loss" in runs["splat-encoder"].data.metrics and "psnr_mean" in runs["fit-photos"].data.metrics
    assert {a.path for a in client.list_artifacts(runs["demo-summary"].info.run_id, "pictures")} == {
        "pictures/contact_sheet.png", "pictures/rate_distortion.png", "pictures/training_curves.png"}
