"""The train job: Ray Train (v2) workers align a splat encoder (or train an RGB open_clip model).

Each worker streams its share of the shards (`samples.stream`), collates batches padded to their
largest n with a mask, and runs the stages of the spec in order: `distill` (MSE to the teacher
embeddings stored in the shards, or, given `images`, to a frozen RGB teacher's embeddings of the
source images, joined to the splats by key and embedded on the worker) and `contrastive` (CLIP loss
over the global batch against the frozen text tower; repeated captions are positives). Gradients of the trainable parameters are averaged over workers with one
all-reduce per optimizer step. Checkpoints hold the trainable weights, optimizer, scheduler, step,
RNG and data position; Ray Train restores the latest one after a worker failure, and a rerun with
the same name (and storage path) resumes it. Rank 0 logs to MLflow and writes the final model.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from splatclip.models.backbone import create, embed_images, input_size, missing_weights
from splatclip.models.gsclip import GSCLIP, from_open_clip
from splatclip.models.model_file import save_model
from splatclip.models.losses import clip_loss, distill_loss
from splatclip.pipelines.layout import shard_name
from splatclip.pipelines.ingest import batches, on_device, steps_per_epoch
from splatclip.pipelines.samples import Skipped, count_samples
from splatclip.pipelines.scoring import zero_shot
from splatclip.platform import storage
from splatclip.platform.runtime import init_ray
from splatclip.platform.secrets import redact
from splatclip.platform.specs import TeacherSpec, TrainSpec
from splatclip.platform.tracking import Tracker, absolute_uri

log = logging.getLogger(__name__)


def run_dir(spec: TrainSpec) -> str:
    return storage.join(spec.storage_path, spec.name)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def poisoned_batches(spec: TrainSpec) -> frozenset:
    """The (epoch, batch) positions whose step raised in an earlier attempt of this run."""
    directory = storage.join(run_dir(spec), "_poisoned")
    found = set()
    for name in storage.listdir(directory, spec.storage):
        parts = name.removesuffix(".json").split("-")
        if len(parts) == 2 and parts[0][1:].isdigit() and parts[1][1:].isdigit():
            found.add((int(parts[0][1:]), int(parts[1][1:])))
    return frozenset(found)


def record_poisoned(spec: TrainSpec, cursor: dict, rank: int, err: BaseException) -> None:
    """Record the batch a step failed on, so that the restarted workers pass over it: a sample that
    kills a worker is never replayed by every restart until `max_failures` runs out."""
    url = storage.join(run_dir(spec), "_poisoned", f"e{cursor['epoch']}-b{cursor['index']}.json")
    log.error("rank %d failed on epoch %d batch %d (%s: %s); restarted workers will pass over it", rank,
              cursor["epoch"], cursor["index"], type(err).__name__, str(err)[:300])
    try:
        storage.write_json(url, {"rank": rank, "error": f"{type(err).__name__}: {err}"[:1000]}, spec.storage)
    except Exception as write_err:  # the original error matters more
        log.error("could not record the failed batch: %s", write_err)


def sync_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients over workers with one flat all-reduce."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def stage_loss(model: GSCLIP, kind: str, batch: dict, device, world: int, teacher=None):
    if model.kind == "splat":
        params, mask = batch["params"].to(device), batch["mask"].to(device)
        if kind == "distill":
            if teacher is not None:
                target = embed_images(teacher, batch["images"].to(device))
            elif "teacher" in batch:
                target = batch["teacher"].to(device)
            else:
                raise RuntimeError("the distill stage needs teacher embeddings in the shards (fit with `teacher:`) "
                                   "or the source images (`images:`)")
            return distill_loss(model.splat_features(params, mask), target)
        image = model.encode_splats(params, mask)
    else:
        image = model.encode_image(batch["images"].to(device))
    text = model.encode_text(batch["tokens"].to(device))
    return clip_loss(image, text, model.logit_scale, batch["positive_ids"]) * world


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    spec: TrainSpec = config["spec"]
    shards, counts = config["shards"], config["counts"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed)
    model = from_open_clip(spec.model.name, spec.model.pretrained, spec.model, spec.storage, device)
    image_size = input_size(model.clip)
    teacher = None
    if spec.images:
        ref = spec.teacher or TeacherSpec(model=spec.model.name, pretrained=spec.model.pretrained)
        torch.manual_seed(spec.seed)  # a backbone without pretrained weights: the same weights as the model's
        teacher, _ = create(ref.model, ref.pretrained, spec.storage, device)
        teacher.requires_grad_(False)

    state = {"stage": 0, "stage_step": 0, "step": 0, "epoch": 0, "batch": 0, "run_id": None}
    restored = ray.train.get_checkpoint()
    saved = None
    if restored:
        with restored.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(saved["weights"], strict=False)
        state.update(saved["position"])
        set_rng_state(saved["rng"])
        log.info("rank %d resumes at step %d (stage %d, epoch %d, batch %d)", rank, state["step"], state["stage"],
                 state["epoch"], state["batch"])

    tracker = Tracker(spec.tracking, "train", rank)
    if tracker.active:
        state["run_id"] = tracker.start(spec, resume_run_id=config["run_id"] or state["run_id"], system_metrics=True)
        tracker.log_params({"model.trainable_share": f"{model.trainable_share():.4f}"})

    skipped = Skipped()
    nonfinite_steps = 0
    poisoned = poisoned_batches(spec)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for si in range(state["stage"], len(spec.stages)):
        stage = spec.stages[si]
        stage_teacher = teacher if stage.kind == "distill" else None  # images are read for it only
        sources = (config["sources"], input_size(teacher)) if stage_teacher is not None else (None, 0)
        cursor: dict = {}
        data = on_device(batches(spec, shards, counts, rank, world, image_size, model.tokenizer, state["epoch"],
                                 state["batch"], skipped, *sources, embed_dim=model.clip.visual.output_dim,
                                 poisoned=poisoned, cursor=cursor), device)
        share = model.set_trainable(stage.unfreeze_blocks)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=spec.weight_decay)
        per_epoch = steps_per_epoch(counts, shards, world, spec.seed, 0, spec.batch_size)
        total = max(1, math.ceil(stage.epochs * per_epoch / spec.grad_accum))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.warmup_steps, total))
        if saved is not None and saved["position"]["stage"] == si and "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
        if rank == 0:
            log.info("stage %d (%s): %d steps, %.2f%% of parameters train", si, stage.kind, total, 100 * share)
        tracker.log_metrics({"trainable_share": share}, step=state["step"])
        tick = time.perf_counter()
        while state["stage_step"] < total:
            loss_sum, waited = 0.0, 0.0
            for _ in range(spec.grad_accum):
                at = None  # the position of the batch in hand; while drawing one, the cursor's
                try:  # this rank's own work on one batch (not the collectives, which fail with any rank)
                    began = time.perf_counter()
                    epoch, index, batch = next(data)
                    waited += time.perf_counter() - began
                    at = {"epoch": epoch, "index": index}
                    with autocast:
                        loss = stage_loss(model, stage.kind, batch, device, world, stage_teacher)
                    (loss / spec.grad_accum).backward()
                except Exception as err:
                    record_poisoned(spec, at or cursor, rank, err)
                    raise
                loss_sum += loss.item() / spec.grad_accum
                state["epoch"], state["batch"] = epoch, index + 1
            sync_gradients(trainable, world)
            norm = torch.nn.utils.clip_grad_norm_(trainable, spec.grad_clip)
            if torch.isfinite(norm):  # the same on every rank: the gradients were averaged
                opt.step()
            else:
                nonfinite_steps += 1
                log.warning("rank %d: non-finite gradients at step %d; the update is skipped", rank, state["step"] + 1)
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["stage_step"] += 1
            state["step"] += 1
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            metrics = {f"loss/{stage.kind}": loss_sum / (world if stage.kind == "contrastive" else 1),
                       "lr": sched.get_last_lr()[0],
                       "stage": si, "samples_per_second": spec.batch_size * spec.grad_accum * world / elapsed,
                       "skipped_samples": sum(skipped.reasons.values()), "nonfinite_steps": nonfinite_steps,
                       "data_wait": waited, "data_wait_fraction": waited / elapsed}
            tracker.log_metrics(metrics, step=state["step"])
            if spec.eval_data and state["step"] % spec.eval_every == 0 and rank == 0:
                tracker.log_metrics(evaluate_during_training(model, spec, device), step=state["step"])
            last = state["stage_step"] == total
            if state["step"] % spec.checkpoint_every == 0 or last:
                tracker.flush()  # every step up to a checkpoint is in MLflow before the checkpoint exists
                report(model, opt, sched, state, si, total, metrics, rank)
        state["stage"], state["stage_step"] = si + 1, 0
    if rank == 0:
        url = save_model(model, storage.join(run_dir(spec), "model.pt"), spec.model, state["step"], spec.seed,
                         spec.storage)
        if tracker.active:
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "model.pt").write_bytes(storage.read_bytes(url, spec.storage))
                tracker.log_artifact(Path(tmp, "model.pt"), "model")
            tracker.set_tags({"splatclip.model_url": url, "splatclip.backbone": spec.model.name})
            if spec.eval_data:
                tracker.log_metrics(evaluate_during_training(model, spec, device), step=state["step"])
        tracker.log_metrics({"skipped." + k: v for k, v in skipped.reasons.items()}, step=state["step"])
        tracker.end()


def source_shards(spec: TrainSpec, shards: list[str]) -> dict[str, str]:
    """Each splat shard's source image shard (the shard of the same name under `images`)."""
    found, _ = storage.input_shards(spec.images, spec.storage, "source image")
    by_name = {shard_name(u): u for u in found}
    missing = [s for s in shards if shard_name(s) not in by_name]
    if missing:
        raise FileNotFoundError(f"images {redact(spec.images)}: no source shard for {len(missing)} splat shard(s), "
                                f"e.g. {shard_name(missing[0])} (a source shard must have its splat shard's name)")
    return {s: by_name[shard_name(s)] for s in shards}


def start_run(tracker: Tracker, spec: TrainSpec) -> str | None:
    """Open the job's MLflow run on the driver (so a new experiment's artifacts live where the job
    runs, not in a worker's directory), or reopen the one a previous run of this name recorded."""
    if not tracker.active:
        return None
    run_file = storage.join(run_dir(spec), "_mlflow_run.json")
    previous = storage.read_json(run_file, spec.storage) if storage.exists(run_file, spec.storage) else {}
    run_id = tracker.start(spec, resume_run_id=tracker.recorded_run(previous))
    storage.write_json(run_file, tracker.run_record(), spec.storage)
    return run_id


def rng_state() -> dict:
    """Every random generator's state in types `torch.load(weights_only=True)` reads back (no pickle)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))


def report(model, opt, sched, state, stage, total, metrics, rank) -> None:
    """A checkpoint from rank 0 (the other ranks report metrics only, as Ray Train v2 expects)."""
    import ray.train

    position = dict(state)
    if state["stage_step"] == total:  # the stage is done: resume at the start of the next one
        position.update(stage=stage + 1, stage_step=0)
    metrics = {**metrics, "step": state["step"]}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        payload = {"weights": model.trainable_state(), "position": position,
                   "rng": rng_state()}
        if position["stage"] == stage:
            payload.update(optimizer=opt.state_dict(), scheduler=sched.state_dict())
        torch.save(payload, Path(tmp) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def evaluate_during_training(model: GSCLIP, spec: TrainSpec, device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    result = zero_shot(model, spec.eval_data, spec.classes, spec.templates, spec.batch_size, spec.storage, device,
                       spec.limits)
    model.train(was_training)
    return {"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]}


def trainer_storage(spec: TrainSpec):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    root = spec.storage_path
    if storage.is_local(root) or not spec.storage.endpoint_url:
        return root, None
    import pyarrow.fs

    fs, _ = storage.filesystem(root, spec.storage)
    return root.split("://", 1)[1], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


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


def make_trainer(spec: TrainSpec, config: dict):
    """The TorchTrainer of a spec: its workers, their resources, the run's storage and restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path, fs = trainer_storage(spec)
    resources = {"CPU": spec.ray.cpus_per_actor}
    if spec.ray.gpus_per_actor:
        resources["GPU"] = spec.ray.gpus_per_actor
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.ray.actors, use_gpu=spec.ray.gpus_per_actor > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=spec.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def run(spec: TrainSpec) -> int:
    spec = absolute_paths(spec)
    shards, _ = storage.input_shards(spec.data, spec.storage, "training")
    if not shards:
        return 2
    for weights in (spec.model.pretrained, spec.teacher and spec.teacher.pretrained):
        if missing_weights(weights):
            log.error("pretrained weights %s: no such file", weights)
            return 2
    sources = None
    if spec.images:
        try:
            sources = source_shards(spec, shards)
        except FileNotFoundError as err:
            log.error("%s", err)
            return 2
    counts = {s: count_samples(s, spec.storage, spec.limits) for s in shards}
    log.info("%d shards, %d samples", len(shards), sum(counts.values()))
    tracker = Tracker(spec.tracking, "train")
    run_id = start_run(tracker, spec)
    with tracker.failed_on_error():
        init_ray(spec.ray)
        from ray.train import TrainingFailedError

        trainer = make_trainer(spec, {"spec": spec, "shards": shards, "counts": counts, "sources": sources,
                                      "run_id": run_id})
        try:
            result = trainer.fit()
        except TrainingFailedError as err:  # a worker's error, after `max_failures` restarts
            log.error("training failed: %s", err)
            tracker.end("FAILED")
            return 1
    print(f"trained {spec.name}: {result.metrics}; model at {storage.join(run_dir(spec), 'model.pt')}")
    return 0
