"""The tracking layer against a real `mlflow server` (SQLite backend) on loopback."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from splatclip.platform.loader import load_spec
from splatclip.platform.specs import FitSpec, TrackingSpec
from splatclip.platform.tracking import Tracker

pytestmark = pytest.mark.integration

SECRET = "very-secret-value-123"


def make_spec(uri):
    return load_spec(FitSpec, None, [
        "input=s3://b/{0..1}.tar", "output=s3://b/out", f"tracking.uri={uri}",
        "tracking.experiment=tests", "tracking.run_name=t1", f"storage.secret_access_key={SECRET}",
    ])


def test_run_logs_params_metrics_artifacts_and_resumes(mlflow_server, tmp_path):
    spec = make_spec(mlflow_server)
    tracker = Tracker(spec.tracking, "fit")
    run_id = tracker.start(spec)
    tracker.log_metrics({"loss": 1.0, "psnr": 20.0}, step=0)
    tracker.log_metrics({"loss": 0.5}, step=1)
    (tmp_path / "summary.json").write_text('{"ok": true}')
    tracker.log_artifact(tmp_path / "summary.json")
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), "sheet.png")
    tracker.end("KILLED")

    resumed = Tracker(spec.tracking, "fit")
    assert resumed.start(spec, resume_run_id=run_id) == run_id
    resumed.log_metrics({"loss": 0.25}, step=2)
    resumed.end()

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t1"
    assert run.data.params["fit.gaussians"] == "400"
    assert run.data.params["input"] == "s3://b/{0..1}.tar"
    assert run.data.tags["splatclip.job"] == "fit" and len(run.data.tags["splatclip.spec_hash"]) == 16
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"summary.json", "pictures"}
    everything = str(run.data.params) + str(run.data.tags)
    for artifact in ("summary.json",):
        everything += open(client.download_artifacts(run_id, artifact, str(tmp_path / "dl"))).read()
    assert SECRET not in everything
    assert not any("secret" in k for k in run.data.params)


def test_disabled_and_non_zero_rank_do_nothing(tmp_path):
    spec = make_spec(f"sqlite:///{tmp_path}/never.db")
    for tracker in (Tracker(TrackingSpec(enabled=False), "fit"), Tracker(spec.tracking, "fit", rank=1)):
        assert tracker.start(spec) is None
        tracker.log_metrics({"x": 1.0}, step=0)
        tracker.end()
    assert not (tmp_path / "never.db").exists()


def test_a_stale_recorded_run_starts_a_new_one(mlflow_server, caplog):
    spec = make_spec(mlflow_server)
    tracker = Tracker(spec.tracking, "fit")
    run_id = tracker.start(spec, resume_run_id="0123456789abcdef0123456789abcdef")  # unknown to this server
    assert run_id and run_id != "0123456789abcdef0123456789abcdef" and "starting a new run" in caplog.text
    record = tracker.run_record()
    tracker.end()
    assert tracker.recorded_run(record) == run_id
    assert tracker.recorded_run({"run_id": run_id, "tracking_uri": "sqlite:////elsewhere/mlflow.db"}) is None
    assert tracker.recorded_run({"run_id": run_id}) == run_id  # a run file from before URIs were recorded
    MlflowClient(mlflow_server).delete_run(run_id)
    again = Tracker(spec.tracking, "fit")
    assert again.start(spec, resume_run_id=run_id) not in (None, run_id)
    again.end()


def test_credentials_in_the_tracking_uri_stay_out_of_the_run(mlflow_server, caplog):
    with_password = mlflow_server.replace("http://", "http://splat:PASSWORD-IN-URI@")
    spec = make_spec(with_password)
    tracker = Tracker(spec.tracking, "fit")
    run_id = tracker.start(spec)  # the server ignores the credentials; the client sends them
    record = tracker.run_record()
    tracker.end()
    run = MlflowClient(mlflow_server).get_run(run_id)
    shown = str(run.data.params) + str(run.data.tags) + str(record) + caplog.text
    assert "PASSWORD-IN-URI" not in shown and SECRET not in shown
    assert run.data.params["tracking.uri"] == mlflow_server.replace("http://", "http://***@")


def test_training_experiments_and_system_metrics(mlflow_server):
    client = MlflowClient(mlflow_server)
    untagged = client.create_experiment("made-elsewhere")  # MLflow's UI would open it in its GenAI view
    for name in ("made-elsewhere", "made-here"):
        spec = load_spec(FitSpec, None, ["input=a.tar", "output=out", f"tracking.uri={mlflow_server}",
                                         f"tracking.experiment={name}", "tracking.system_metrics=60"])
        tracker = Tracker(spec.tracking, "fit")
        run_id = tracker.start(spec, system_metrics=True)
        tracker.end()  # sooner than the interval: the last sample is still there
        experiment = client.get_experiment_by_name(name)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        metrics = client.get_run(run_id).data.metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert client.get_experiment_by_name("made-elsewhere").experiment_id == untagged
    off = load_spec(FitSpec, None, ["input=a.tar", "output=out", f"tracking.uri={mlflow_server}",
                                    "tracking.experiment=made-here", "tracking.system_metrics=0"])
    tracker = Tracker(off.tracking, "fit")
    run_id = tracker.start(off, system_metrics=True)
    tracker.end()
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
