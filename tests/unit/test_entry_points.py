"""The job entry points, run as a user runs them: a spec whose data matches no shard stops at once."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("job, what", [("train", "training"), ("evaluate", "evaluation")])
def test_a_job_given_no_shards_exits_2_naming_the_pattern(tmp_path, job, what):
    pattern = str(tmp_path / "nowhere-{00000..00001}.tar")
    spec = {"train": "train.local.yaml", "evaluate": "eval.local.yaml"}[job]
    proc = subprocess.run([sys.executable, f"jobs/{job}.py", f"jobs/specs/{spec}", "--set", f"data={pattern}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"no {what} shards match {pattern} (2 expected names missing)" in proc.stderr
    assert "Ray instance" not in proc.stderr  # it stopped before starting or joining a cluster


def test_evaluate_given_no_model_file_exits_2_naming_it(tmp_path):
    (tmp_path / "test-00000.tar").write_bytes(b"")  # a shard is found; the model is not
    missing = tmp_path / "runs" / "nothing" / "model.pt"
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "jobs/specs/eval.local.yaml", "--set",
                           f"data={tmp_path}/test-00000.tar", "--set", f"checkpoint={missing}",
                           "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint {missing}: no such model file" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # stopped before opening an MLflow run


def test_fit_with_a_missing_teacher_weights_file_exits_2_before_writing(tmp_path):
    (tmp_path / "src-00000.tar").write_bytes(b"")
    proc = subprocess.run([sys.executable, "jobs/fit.py", "jobs/specs/fit.local.yaml", "--set",
                           f"input={tmp_path}/src-00000.tar", "--set", f"output={tmp_path}/out", "--set",
                           "teacher.model=demo-vit", "--set", f"teacher.pretrained={tmp_path}/missing.pt"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"teacher.pretrained {tmp_path}/missing.pt: no such file" in proc.stderr
    assert not (tmp_path / "out").exists() and "Ray instance" not in proc.stderr



def test_serve_given_a_model_not_in_the_registry_exits_2_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/serve.py", "jobs/specs/serve.local.yaml", "--set",
                           "model=models:/nobody-registered-this/1", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model models:/nobody-registered-this/1: not in the registry at sqlite:///" in proc.stderr
    assert "Ray instance" not in proc.stderr and "Traceback" not in proc.stderr
