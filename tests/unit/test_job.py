"""The job skeleton fit, train and evaluate share: inputs, the MLflow run and its run file, failure.
MLflow runs in a SQLite file (no server); the evaluate job is the real one."""

import logging

import pytest
from mlflow.tracking import MlflowClient

from splatclip.pipelines.evaluate import EvalJob
from splatclip.pipelines.job import Job
from splatclip.platform import storage
from splatclip.platform.shards import write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import EvalSpec


class Step(Job):
    """A job whose body does what the test says: return a status, or raise."""

    name = "evaluate"
    inputs = ("data",)

    def __init__(self, spec, outcome, run_file=None):
        super().__init__(spec)
        self.outcome, self.file = outcome, run_file

    def check(self):
        problems = []
        found, missing = self.shards(self.spec.data, "evaluation", problems)
        return problems + (["a missing shard"] if found and missing else [])

    def run_file(self):
        return self.file

    def body(self, tracker):
        tracker.log_metrics({"reached": 1.0})
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def spec(tmp_path, *overrides):
    (tmp_path / "s-0.tar").write_bytes(b"")
    return load_spec(EvalSpec, None, [f"data={tmp_path}/s-0.tar", "checkpoint=model.pt",
                                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides])


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])


@pytest.mark.parametrize("outcome, status, run_status", [(0, 0, "FINISHED"), (1, 1, "FAILED"),
                                                         (RuntimeError("disk on fire"), 1, "FAILED")])
def test_the_run_ends_as_the_job_did(tmp_path, outcome, status, run_status):
    assert Step(spec(tmp_path), outcome).run() == status
    (run,) = runs(tmp_path)
    assert run.info.status == run_status and run.data.metrics["reached"] == 1.0


def test_an_exception_is_logged_without_the_secrets_it_holds(tmp_path, caplog):
    from splatclip.platform.secrets import RedactingFilter

    caplog.handler.addFilter(RedactingFilter(["hunter2"]))
    err = RuntimeError("cannot reach https://admin:hunter2@tracking.internal/ with key hunter2")
    with caplog.at_level(logging.ERROR):
        assert Step(spec(tmp_path), err).run() == 1
    assert "the evaluate job failed" in caplog.text and "RuntimeError: cannot reach" in caplog.text
    assert "hunter2" not in caplog.text


def test_an_interrupted_job_marks_its_run_killed_and_stops(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        Step(spec(tmp_path), KeyboardInterrupt()).run()
    assert runs(tmp_path)[0].info.status == "KILLED"


def test_problems_stop_the_job_before_a_run_is_opened(tmp_path, caplog):
    bad = spec(tmp_path).model_copy(update={"data": f"{tmp_path}/s-{{0..2}}.tar"})
    assert Step(bad, 0).run() == 2
    assert "a missing shard" in caplog.text and "evaluation shard missing" in caplog.text
    assert not (tmp_path / "mlflow.db").exists()
    nothing = spec(tmp_path).model_copy(update={"data": f"{tmp_path}/none-{{0..1}}.tar"})
    assert Step(nothing, 0).run() == 2
    assert f"no evaluation shards match {tmp_path}/none-{{0..1}}.tar (2 expected names missing)" in caplog.text
    unknown = spec(tmp_path).model_copy(update={"data": "examples://cats/*.tar"})
    assert Step(unknown, 0).run() == 2 and "data: examples://cats/*.tar: unknown example set 'cats'" in caplog.text


def test_a_rerun_reopens_the_run_its_run_file_names(tmp_path):
    run_file = str(tmp_path / "out" / "_mlflow_run.json")
    assert Step(spec(tmp_path), RuntimeError("killed half way"), run_file).run() == 1
    first = storage.read_json(run_file)["run_id"]
    assert Step(spec(tmp_path), 0, run_file).run() == 0
    (run,) = runs(tmp_path)
    assert run.info.run_id == first and run.info.status == "FINISHED"


def test_runs_with_one_parent_name_are_grouped_under_one_parent_run(tmp_path):
    grouped = spec(tmp_path, "tracking.parent=nightly chain")
    assert Step(grouped, 0).run() == 0
    assert Step(grouped, 1).run() == 1
    parent, *children = runs(tmp_path)
    assert parent.info.run_name == "nightly chain" and parent.data.tags["splatclip.group"] == "true"
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [parent.info.run_id] * 2
    assert parent.info.status == "FAILED"  # as its last run ended
    assert Step(spec(tmp_path, "tracking.parent=another chain"), 0).run() == 0
    assert len({r.data.tags.get("mlflow.parentRunId") for r in runs(tmp_path)} - {None}) == 2


def test_evaluate_with_a_corrupt_model_file_fails_its_run(tmp_path, caplog):
    """The real evaluate job, given a model file that is not one: exit 1, the run FAILED, the
    error named; nothing written where its results would go."""
    url = str(tmp_path / "test-00000.tar")
    with write_shard(url) as w:
        w.write({"__key__": "k0", "splats.npy": b"", "cls": b"0"})
    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    job = EvalJob(load_spec(EvalSpec, None, [f"data={url}", f"checkpoint={tmp_path}/model.pt",
                                             f"output={tmp_path}/eval.json", "classes=digits", "templates=digits",
                                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]))
    assert job.run() == 1
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["splatclip.job"] == "evaluate"
    assert not (tmp_path / "eval.json").exists()
    assert "the evaluate job failed" in caplog.text
