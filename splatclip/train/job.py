"""The train job's driver: the spec's paths, the shards and their counts, and Ray Train's set-up.

Ray Train (v2) workers run `train_loop` (the stages, the steps, the checkpoints); this module only
prepares what they read and starts them. See `train_loop` and `train_state` for what a run does and
keeps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

from splatclip.models.backbone import missing_weights
from splatclip.models.objectives import OBJECTIVES, stage_problems
from splatclip.pipelines.job import Job
from splatclip.pipelines.layout import fit_recipe, shard_name
from splatclip.pipelines.samples import ShardSet, count_samples
from splatclip.train.loop import train_loop
from splatclip.train.state import run_dir
from splatclip.platform import storage
from splatclip.platform.progress import Meter
from splatclip.platform.runtime import actor_request
from splatclip.platform.secrets import redact
from splatclip.platform.specs import TrainSpec
from splatclip.platform.tracking import Tracker, absolute_uri

log = logging.getLogger(__name__)


def absolute_paths(spec: TrainSpec) -> TrainSpec:
    """The spec with its relative local paths made absolute: Ray Train workers run in a directory of
    their own, not the job's. Shard patterns, the storage path and a SQLite tracking URI always are
    paths; a model name, weights, class names or templates only when such a file exists (otherwise
    a name or a tag)."""

    def pattern(value):
        return os.path.abspath(value) if value is not None and "://" not in value else value

    def file(value):
        return os.path.abspath(value) if value is not None and "://" not in value and os.path.exists(value) else value

    update = {"data": pattern(spec.data), "images": pattern(spec.images), "eval_data": pattern(spec.eval_data),
              "storage_path": pattern(spec.storage_path), "classes": file(spec.classes),
              "templates": file(spec.templates),
              "model": spec.model.model_copy(update={"name": file(spec.model.name),
                                                     "pretrained": file(spec.model.pretrained)})}
    if spec.teacher is not None:
        update["teacher"] = spec.teacher.model_copy(update={"model": file(spec.teacher.model),
                                                            "pretrained": file(spec.teacher.pretrained)})
    update["tracking"] = spec.tracking.model_copy(update={"uri": absolute_uri(spec.tracking.uri)})
    return spec.model_copy(update=update)


def trainer_storage(spec: TrainSpec):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig. Object storage goes
    through the project's s3fs, so checkpoints get the spec's endpoint, credentials and retry policy."""
    root = spec.storage_path
    if storage.is_local(root):
        return root, None  # Ray Train's own local filesystem
    import pyarrow.fs

    fs, _ = storage.filesystem(root, spec.storage)
    return root.split("://", 1)[1], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def training_storage_failure(err: Exception, url: str) -> str | None:
    """What storage did to a failed training, in one line, or None: a worker's StorageError (reading
    shards, uploading a checkpoint), or the controller failing to write Ray Train's own state (its
    checkpoint records) into the run directory."""
    found = storage.storage_failure(err)
    if found:
        return found
    cause = getattr(err, "controller_failure", None)
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        return f"Ray Train's state in {redact(url)}: {storage.describe(cause)}"
    return None


def cuda_on_workers(request: dict[str, float]) -> bool:
    """Whether a process with a training worker's resources sees a CUDA device. A node's GPUs may be
    logical only (a local cluster's, a misconfigured node): the process group then uses gloo and the
    workers compute on the CPU, where NCCL would fail to start."""
    import ray

    from splatclip.platform.runtime import ray_options

    @ray.remote(**ray_options(request))
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return ray.get(probe.remote())


def make_trainer(spec: TrainSpec, config: dict, request: dict[str, float]):
    """The TorchTrainer of a spec: its workers, their resources (`request`, as the cluster check
    fitted it), the run's storage and restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path, fs = trainer_storage(spec)
    gpus = request.get("GPU", 0) > 0
    backend = "nccl" if gpus and cuda_on_workers(request) else "gloo"
    if gpus and backend == "gloo":
        log.warning("the training workers' GPUs are logical only (torch sees no CUDA device there): they train "
                    "on the CPU")
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=spec.ray.actors, use_gpu=gpus, resources_per_worker=request),
        run_config=RunConfig(name=spec.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


class TrainJob(Job):
    name = "train"
    inputs = ("data", "images", "eval_data")
    system_metrics = False  # rank 0 samples its own node; the driver only waits
    uses_ray = True

    def check(self) -> list[str]:
        spec = self.spec = absolute_paths(self.spec)
        problems = stage_problems(spec.stages, spec.model.encoder, spec.images is not None,
                                  spec.model.canonical_spread is not None)
        views = [f"model.{name}" for name in ("canonical_spread", "canonical_level") if getattr(spec.model, name) is not None]
        if views and spec.images is None and any(
                stage.kind in OBJECTIVES and OBJECTIVES[stage.kind].reads_images for stage in spec.stages):
            problems.append(f"{views[0]}: stored teacher embeddings are of the images as they are, not as this model "
                            "sees them; set images, so that the teacher embeds each image as the model sees it")
        for weights in (spec.model.pretrained, spec.teacher and spec.teacher.pretrained):
            if missing_weights(weights):
                problems.append(f"pretrained weights {weights}: no such file")
        if spec.tracking.register and (spec.model.encoder != "splat" or not spec.tracking.enabled):
            problems.append(f"tracking.register {spec.tracking.register}: registers a splat encoder in MLflow, and "
                            f"this run {'trains an RGB model' if spec.tracking.enabled else 'has tracking off'}")
        self.shard_list = self.shards(spec.data, "training", problems)[0]
        self.sources = None
        if spec.images and self.shard_list:
            self.sources = self.source_shards(problems)
        if not problems:
            fit = fit_recipe(self.shard_list, spec.storage) if spec.model.encoder == "splat" else None
            shards = ShardSet(tuple(self.shard_list), spec.storage, self.sources, fit=fit)
            self.data = dataclasses.replace(shards, counts=count_samples(shards, spec.limits))
            log.info("%d shards, %d samples", len(self.shard_list), sum(self.data.counts.values()))
        return problems

    def source_shards(self, problems: list[str]) -> dict[str, str] | None:
        """Each splat shard's source image shard (the shard of the same name under `images`)."""
        by_name = {shard_name(u): u for u in self.shards(self.spec.images, "source image", problems)[0]}
        missing = [s for s in self.shard_list if shard_name(s) not in by_name]
        if missing and by_name:
            problems.append(f"images {redact(self.spec.images)}: no source shard for {len(missing)} splat shard(s), e.g. "
                            f"{shard_name(missing[0])} (a source shard must have its splat shard's name)")
        return {s: by_name[shard_name(s)] for s in self.shard_list if shard_name(s) in by_name}

    def requests(self) -> dict[str, tuple[dict[str, float], int]]:
        return {"a training worker": (actor_request(self.spec.ray), self.spec.ray.actors)}

    def cluster_paths(self) -> dict[str, str]:
        spec = self.spec
        paths = {"data": spec.data, "images": spec.images, "eval_data": spec.eval_data,
                 "storage_path": spec.storage_path, "model.pretrained": spec.model.pretrained,
                 "teacher.pretrained": spec.teacher and spec.teacher.pretrained}
        if spec.tracking.enabled and spec.tracking.uri.startswith("sqlite:///"):  # rank 0 logs from its node
            paths["tracking.uri"] = spec.tracking.uri
        weights = ("model.pretrained", "teacher.pretrained")  # a tag names no file
        return {k: v for k, v in paths.items() if v and (k not in weights or os.path.exists(v))}

    def lease_dir(self) -> str:
        return run_dir(self.spec)

    def run_file(self) -> str:
        return storage.join(run_dir(self.spec), "_mlflow_run.json")

    def needs_ray(self) -> bool:
        return True

    def body(self, tracker: Tracker) -> int:
        from ray.train import TrainingFailedError

        spec = self.spec
        if self.data.fit:  # how the training splats were fitted, beside the spec on the run's page
            tracker.log_params({f"data_fit.{key}": value for key, value in self.data.fit.items()})
        try:
            with Watch() as progress:
                trainer = make_trainer(spec, {"spec": spec, "shards": self.data, "run_id": tracker.run_id,
                                              "progress": progress.queue}, self.placed["a training worker"])
                result = trainer.fit()
        except TrainingFailedError as err:  # a worker's error, after `max_failures` restarts
            failure = training_storage_failure(err, run_dir(spec))
            if failure:
                log.error("the train job failed: storage: %s", failure)
            else:
                log.error("training failed: %s", err)
            return 1
        model = storage.join(run_dir(spec), "model.pt")
        print(f"trained {spec.name}: {result.metrics}; model at {model}")
        if tracker.active and spec.tracking.register:
            from splatclip.serve.pyfunc import ARTIFACT, log_encoder

            version = log_encoder(tracker.client, tracker.run_id, model, spec.classes,
                                  spec.templates, spec.limits, spec.storage, spec.tracking.register)
            print(f"MLflow model runs:/{tracker.run_id}/{ARTIFACT}, registered as "
                  f"models:/{spec.tracking.register}/{version}")
        return 0


class Watch:
    """The driver's view of the steps while Ray Train runs: rank 0 puts (step, total steps) on a
    queue (a Ray actor that needs no CPU, on the driver's node, which lives as long as the driver); a
    thread here feeds them to a progress `Meter`."""

    def __enter__(self) -> "Watch":
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="train-progress", daemon=True)
        self.thread.start()
        return self

    def watch(self) -> None:
        from ray.util.queue import Empty

        meter = None
        while not self.stop.is_set():
            try:
                done, total = self.queue.get(timeout=1.0)
            except Empty:
                continue
            except Exception as err:  # noqa: BLE001 - the queue's actor lost: no progress line, training goes on
                log.warning("no progress line any more: %s", err)
                return
            meter = meter or Meter("train", "steps", total)
            meter.update(done, total=total)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.queue.shutdown()


def run(spec: TrainSpec) -> int:
    return TrainJob(spec).run()
