"""MLflow tracking: one run per job, logged from rank 0 only, resumable by run id.

`Tracker` wraps an `MlflowClient` bound to one run id, so several jobs (or Ray workers) in one
process never fight over MLflow's global active run. A disabled tracker, or one on a rank other
than 0, accepts every call and does nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from splatclip.platform.secrets import redact
from splatclip.platform.serialize import flatten, public_dict, spec_hash
from splatclip.platform.specs import TrackingSpec

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value is 6000 characters


def git_commit() -> str | None:
    """The commit of the code running, from SPLATCLIP_GIT_COMMIT or git, if either knows."""
    if os.environ.get("SPLATCLIP_GIT_COMMIT"):
        return os.environ["SPLATCLIP_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same from any working directory: `sqlite:///mlflow.db` (relative
    to the current directory) becomes `sqlite:////abs/path/mlflow.db`; others are returned as they are."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


FLUSH_SECONDS = 2.0
FLUSH_COUNT = 1000  # MLflow's limit of metrics per log_batch request
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_TAG, GROUP_TAG = "mlflow.parentRunId", "splatclip.group"  # MLflow nests a run under its parentRunId


class Tracker:
    def __init__(self, spec: TrackingSpec, job: str, rank: int = 0, hold: bool = False):
        """`hold`: queued metrics wait for `flush()` (a training loop's checkpoints), so a worker
        restored from its last checkpoint never logs a step twice."""
        self.spec = spec
        self.job = job
        self.hold = hold
        self.active = spec.enabled and rank == 0
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._pending: list = []  # metrics not yet sent (see log_metrics)
        self._sent = time.monotonic()
        self._monitor = None  # MLflow's system metrics sampler, while the run is open
        self.parent_id: str | None = None  # the run's parent (`spec.parent`), if it has one

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # MLflow prints "View run at URL" with the tracking URI whole (credentials included) when a
            # run ends; `end` logs that link redacted instead
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            self._client = MlflowClient(tracking_uri=self.spec.uri)
        return self._client

    def recorded_run(self, record: dict) -> str | None:
        """The run id a job's run file recorded, unless it was recorded for another tracking URI."""
        run_id = record.get("run_id")
        recorded_uri = record.get("tracking_uri")
        if run_id and recorded_uri is not None and recorded_uri != redact(self.spec.uri):
            log.warning("the recorded MLflow run %s belongs to %s, not %s: starting a new run", run_id, recorded_uri,
                        redact(self.spec.uri))
            return None
        return run_id

    def run_record(self) -> dict:
        """What a job writes to its run file, for a rerun to resume (no credentials)."""
        return {"run_id": self.run_id, "tracking_uri": redact(self.spec.uri)}

    def _resumable(self, run_id: str):
        """The run to resume, or None (with a warning) when this tracking server does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            log.warning("MLflow run %s is not on %s (%s): starting a new run", run_id, redact(self.spec.uri),
                        redact(str(err))[:200])
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s was deleted: starting a new run", run_id)
            return None
        return run

    def experiment(self) -> str:
        """The id of the spec's experiment, created as a model-training one (MLflow 3's UI opens an
        experiment without `mlflow.experimentKind` in its GenAI view); an existing one without the
        tag gets it."""
        client = self.client
        experiment = client.get_experiment_by_name(self.spec.experiment)
        if experiment is None:
            return client.create_experiment(self.spec.experiment, tags={EXPERIMENT_KIND: TRAINING_KIND})
        if EXPERIMENT_KIND not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        return experiment.experiment_id

    def group_run(self, experiment_id: str | None = None) -> str:
        """The id of the parent run named `spec.parent`: the newest in the experiment, or a new one."""
        client = self.client
        experiment_id = experiment_id or self.experiment()
        found = client.search_runs([experiment_id], f"tags.`{GROUP_TAG}` = 'true' and "
                                   f"attributes.run_name = '{self.spec.parent}'", order_by=["start_time DESC"],
                                   max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=self.spec.parent, tags={GROUP_TAG: "true", **self.spec.tags})
        log.info("MLflow parent run %s (%r) in experiment %r", run.info.run_id, self.spec.parent, self.spec.experiment)
        return run.info.run_id

    def start(self, job_spec: BaseModel | None, resume_run_id: str | None = None, system_metrics: bool = False) -> str | None:
        """Open (or reopen) the run, tag it and log the spec as params. Returns the run id.
        `system_metrics`: this process samples its machine's CPU, memory (and GPUs, where
        nvidia-ml-py is installed) into the run every `spec.system_metrics` seconds (0: never)."""
        if not self.active:
            return None
        client = self.client
        run = self._resumable(resume_run_id) if resume_run_id else None
        if run is not None:
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            client.update_run(self.run_id, status="RUNNING")
            log.info("resuming MLflow run %s", self.run_id)
        else:
            experiment_id = self.experiment()
            tags = {"splatclip.job": self.job, **self.spec.tags}
            if job_spec is not None:
                tags["splatclip.spec_hash"] = spec_hash(job_spec)
            commit = git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            if self.spec.parent:
                tags[PARENT_TAG] = self.group_run(experiment_id)
            run = client.create_run(experiment_id, run_name=self.spec.run_name, tags=tags)
            self.run_id, self.experiment_id = run.info.run_id, experiment_id
            log.info("MLflow run %s in experiment %r at %s", self.run_id, self.spec.experiment, redact(self.spec.uri))
        self.parent_id = run.data.tags.get(PARENT_TAG)
        if self.parent_id:  # a parent runs while any of its runs does
            client.update_run(self.parent_id, status="RUNNING")
        if job_spec is not None:
            self.log_params(flatten(public_dict(job_spec)))
        if system_metrics and self.spec.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.spec.system_metrics,
                                                 resume_logging=True, tracking_uri=self.spec.uri)
            self._monitor.start()
        return self.run_id

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        existing = self.client.get_run(self.run_id).data.params
        from mlflow.entities import Param

        fresh = [
            Param(key, str(value)[:MAX_PARAM_CHARS])
            for key, value in params.items()
            if key not in existing
        ]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue the metrics with their time and step; they are sent in one request once FLUSH_SECONDS
        have passed since the last one (or FLUSH_COUNT are queued), and when the run ends. A
        training loop holds them until each checkpoint (`hold`): it pays no request (~20 ms on
        sqlite) per step, a killed job loses no metric of a step it will not redo, and a restored
        one logs no step twice."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if not self.hold and (len(self._pending) >= FLUSH_COUNT or time.monotonic() - self._sent >= FLUSH_SECONDS):
            self.flush()

    def last_step(self, key: str) -> int:
        """The latest step the run has for a metric (-1: none, or no run here)."""
        if not self.active:
            return -1
        metrics = self.client.get_run(self.run_id).data.to_proto().metrics
        return max((m.step for m in metrics if m.key == key), default=-1)

    def flush(self) -> None:
        """Send the queued metrics now."""
        if self.active and self._pending:
            pending, self._pending = self._pending, []
            for i in range(0, len(pending), FLUSH_COUNT):
                self.client.log_batch(self.run_id, metrics=pending[i : i + FLUSH_COUNT])
        self._sent = time.monotonic()

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self.client.log_text(self.run_id, text, name)

    def log_image(self, image: np.ndarray, name: str) -> None:
        """An HxWx3 uint8 picture as a PNG artifact."""
        if not self.active:
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            Image.fromarray(image).save(path)
            self.client.log_artifact(self.run_id, str(path), "pictures")

    def end(self, status: str = "FINISHED") -> None:
        """Close the run and, for a tracking server, log its link (credentials redacted)."""
        if not (self.active and self.run_id):
            return
        self.flush()
        if self._monitor is not None:  # stopped, then one last sample: a run shorter than the interval has one too
            self._monitor.finish()
            self._monitor.collect_metrics()
            self._monitor.publish_metrics(self._monitor.aggregate_metrics())
            self._monitor.mlflow_logger.flush()
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)
        if self.parent_id:  # the parent ends as its last run did (and runs again with the next)
            self.client.set_terminated(self.parent_id, status=status)
        if self.spec.uri.startswith(("http://", "https://")):
            log.info("MLflow run %s (%s): %s/#/experiments/%s/runs/%s", self.run_id, status,
                     redact(self.spec.uri).rstrip("/"), self.experiment_id, self.run_id)
