"""The loop every Ray Train worker runs: the stages of a spec in order, one optimizer step at a time.

Each stage names an objective (`splatclip.models.objectives`); the loop draws batches from the
ingest (`Ingest.batches`, decoded ahead of the step in loader processes), averages the trainable
parameters' gradients over the workers with one all-reduce per optimizer step, logs every step to
MLflow from rank 0 (sent with each checkpoint, so a restore logs no step twice), evaluates zero-shot every `eval_every` steps, and checkpoints its `TrainState`
(`train_state`). Ray Train restores the latest checkpoint after a worker failure, and a rerun with
the same name and storage path resumes it. Rank 0 writes the final model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from splatclip.models.backbone import create, input_size
from splatclip.models.gsclip import from_open_clip
from splatclip.models.model_file import save_model
from splatclip.models.objectives import OBJECTIVES, Objective, settings
from splatclip.pipelines.layout import view_of
from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, WorkerShare
from splatclip.pipelines.scoring import LabeledSet, zero_shot
from splatclip.train.ingest import Ingest, on_device, steps_per_epoch
from splatclip.train.state import (TrainState, poisoned_batches, read_checkpoint, record_poisoned, run_dir,
                                             write_checkpoint)
from splatclip.platform import storage
from splatclip.platform.specs import TeacherSpec, TrainSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger(__name__)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


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


class Stage:
    """What one stage trains with: its objective, batches, optimizer and schedule."""

    def __init__(self, loop: "Loop", index: int):
        spec = loop.spec
        self.index, self.spec = index, spec.stages[index]
        teacher = loop.teacher if OBJECTIVES[self.spec.kind].reads_images else None  # images read for it only
        self.objective: Objective = OBJECTIVES[self.spec.kind](settings(self.spec.kind, self.spec.options), teacher)
        self.cursor: dict = {}  # the position being drawn, for the record of a failure
        fmt = SampleFormat(encoder=spec.model.encoder, image_size=input_size(loop.model.clip),
                           source_size=input_size(teacher) if teacher is not None else None,
                           embed_dim=loop.model.clip.visual.output_dim, limits=spec.limits,
                           view=view_of(loop.shards.fit))  # the source images as their splats
        shards = loop.shards if teacher is not None else dataclasses.replace(loop.shards, sources=None)
        ingest = Ingest(spec, shards, fmt, loop.share, loop.model.tokenizer)
        self.data = on_device(ingest.batches((loop.state.epoch, loop.state.batch), loop.skipped, loop.poisoned,
                                             self.cursor), loop.device)
        self.trainable = loop.model.set_trainable(self.spec.unfreeze_blocks)
        self.params = [p for p in loop.model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters, on the CPU as on a GPU (the demo's teacher, 8.4M parameters: 6 ms
        # a step against 45 ms for the per-parameter loop, a quarter of its step)
        self.opt = torch.optim.AdamW(self.params, lr=self.spec.lr, weight_decay=spec.weight_decay, fused=True)
        self.total = loop.totals[index]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(self.spec.warmup_steps, self.total))


class Loop:
    """One worker's training, from the spec and the driver's listing of the shards."""

    def __init__(self, spec: TrainSpec, shards: ShardSet, run_id: str | None, progress):
        import ray.train
        import ray.train.torch

        self.spec, self.shards = spec, shards
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.share = WorkerShare(self.rank, self.world, spec.seed)
        per_epoch = steps_per_epoch(shards, self.share, 0, spec.batch_size)
        self.totals = [max(1, math.ceil(s.epochs * per_epoch / spec.grad_accum)) for s in spec.stages]  # steps
        self.progress = progress if self.rank == 0 else None  # the driver's queue of (step, total steps)
        self.told = 0.0  # when the driver last heard of a step
        # the GPU Ray assigned when torch sees one; a logical GPU alone (a local cluster's) trains on the CPU
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(spec.seed)
        self.model = from_open_clip(spec.model.name, spec.model.pretrained, spec.model, spec.storage, self.device)
        self.teacher = None
        if spec.images:
            ref = spec.teacher or TeacherSpec(model=spec.model.name, pretrained=spec.model.pretrained)
            torch.manual_seed(spec.seed)  # a backbone without pretrained weights: the same weights as the model's
            self.teacher, _ = create(ref.model, ref.pretrained, spec.storage, self.device)
            self.teacher.requires_grad_(False)
        self.state = TrainState()
        self.saved = self.restore()  # sets `state` when the run has a checkpoint
        self.tracker = Tracker(spec.tracking, "train", self.rank, hold=True)  # steps reach MLflow with checkpoints
        if self.tracker.active:
            self.state.run_id = self.tracker.start(spec, resume_run_id=run_id or self.state.run_id,
                                                   system_metrics=True)
            self.tracker.log_params({"model.trainable_share": f"{self.model.trainable_share():.4f}"})
        # steps a lost worker had logged (with the checkpoint it was writing when it went): not again
        self.logged_through = self.tracker.last_step("lr") if self.saved is not None else -1
        self.skipped = Skipped()
        self.nonfinite_steps = 0
        self.poisoned = poisoned_batches(spec)
        cuda = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)

    def restore(self) -> dict | None:
        """The latest checkpoint of the run, if there is one: weights, position and generators set
        from it; its optimizer and scheduler are set when their stage starts."""
        import ray.train

        restored = ray.train.get_checkpoint()
        if not restored:
            return None
        with restored.as_directory() as d:
            saved = read_checkpoint(Path(d), self.rank, self.device)
        self.model.load_state_dict(saved["weights"], strict=False)
        self.state = dataclasses.replace(saved["position"])  # the saved position stays as it was
        log.info("rank %d resumes at step %d (stage %d, epoch %d, batch %d)", self.rank, self.state.step,
                 self.state.stage, self.state.epoch, self.state.batch)
        return saved

    def run(self) -> None:
        for index in range(self.state.stage, len(self.spec.stages)):
            self.run_stage(Stage(self, index))
        self.finish()

    def run_stage(self, stage: Stage) -> None:
        saved = self.saved
        if saved is not None and saved["position"].stage == stage.index and "optimizer" in saved:
            stage.opt.load_state_dict(saved["optimizer"])
            stage.sched.load_state_dict(saved["scheduler"])
        if self.rank == 0:
            log.info("stage %d (%s): %d steps, %.2f%% of parameters train", stage.index, stage.spec.kind, stage.total,
                     100 * stage.trainable)
        self.log({"trainable_share": stage.trainable})
        tick = time.perf_counter()
        while self.state.stage_step < stage.total:
            loss, waited = self.step(stage)
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            metrics = {f"loss/{stage.spec.kind}": loss, "lr": stage.sched.get_last_lr()[0], "stage": stage.index,
                       "samples_per_second": self.spec.batch_size * self.spec.grad_accum * self.world / elapsed,
                       "skipped_samples": sum(self.skipped.reasons.values()), "nonfinite_steps": self.nonfinite_steps,
                       "data_wait": waited, "data_wait_fraction": waited / elapsed}
            self.log(metrics)
            if self.spec.eval_data and self.state.step % self.spec.eval_every == 0 and self.rank == 0:
                self.log(self.evaluate())
            last = self.state.stage_step == stage.total
            self.tell(last)
            if self.state.step % self.spec.checkpoint_every == 0 or last:
                self.tracker.flush()  # the steps up to a checkpoint, and no later ones: a restore redoes those
                self.checkpoint(stage, metrics, last)
        self.state = self.state.next_stage()

    def tell(self, last: bool) -> None:
        """Rank 0: the step to the driver's progress line, at most once a second; a driver that cannot
        hear (gone, or its queue's actor lost) costs the training nothing."""
        if self.progress is None or not (last or time.perf_counter() - self.told >= 1.0):
            return
        self.told = time.perf_counter()
        try:
            self.progress.put_nowait((self.state.step, sum(self.totals)))
        except Exception as err:  # noqa: BLE001 - progress is for a watcher, never a reason to stop
            log.warning("progress is not reported any more: %s", err)
            self.progress = None

    def log(self, metrics: dict) -> None:
        """Metrics of the current step, unless MLflow has this step already (a restore redoes steps)."""
        if self.state.step > self.logged_through:
            self.tracker.log_metrics(metrics, step=self.state.step)

    def step(self, stage: Stage) -> tuple[float, float]:
        """One optimizer step over `grad_accum` batches: (the loss, seconds spent waiting for batches)."""
        spec, loss_sum, waited = self.spec, 0.0, 0.0
        scale = self.world if stage.objective.global_batch else 1
        for _ in range(spec.grad_accum):
            at = None  # the position of the batch in hand; while drawing one, the cursor's
            try:  # this rank's own work on one batch (not the collectives, which fail with any rank)
                began = time.perf_counter()
                epoch, index, batch = next(stage.data)
                waited += time.perf_counter() - began
                at = {"epoch": epoch, "index": index}
                with self.autocast:
                    loss = stage.objective(self.model, batch, self.device)
                (loss * scale / spec.grad_accum).backward()
            except Exception as err:
                record_poisoned(spec, at or stage.cursor, self.rank, err)
                raise
            loss_sum += loss.item() / spec.grad_accum
            self.state.epoch, self.state.batch = epoch, index + 1
        sync_gradients(stage.params, self.world)
        norm = torch.nn.utils.clip_grad_norm_(stage.params, spec.grad_clip)
        if torch.isfinite(norm):  # the same on every rank: the gradients were averaged
            stage.opt.step()
        else:
            self.nonfinite_steps += 1
            log.warning("rank %d: non-finite gradients at step %d; the update is skipped", self.rank,
                        self.state.step + 1)
        stage.sched.step()
        stage.opt.zero_grad(set_to_none=True)
        self.state.stage_step += 1
        self.state.step += 1
        return loss_sum, waited

    def checkpoint(self, stage: Stage, metrics: dict, last: bool) -> None:
        """Every rank reports its generators; rank 0 the weights, position and (within a stage) the
        optimizer. Ray Train merges the ranks' files into one checkpoint directory."""
        import ray.train

        position = self.state.next_stage() if last else self.state  # a finished stage resumes at the next
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                optimizer, scheduler = (None, None) if last else (stage.opt.state_dict(), stage.sched.state_dict())
                write_checkpoint(Path(tmp), 0, self.device, position, self.model.trainable_state(), optimizer, scheduler)
            else:
                write_checkpoint(Path(tmp), self.rank, self.device)
            with storage.guarded("checkpoint to", run_dir(self.spec)):  # Ray Train uploads it here (the spec's s3fs)
                ray.train.report({**metrics, "step": self.state.step},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def evaluate(self) -> dict[str, float]:
        """Zero-shot top-1/top-5 on the spec's `eval_data`: the accuracy curve of the run."""
        was_training = self.model.training
        self.model.eval()
        spec = self.spec
        labeled = LabeledSet(spec.eval_data, spec.classes, spec.templates, spec.storage, spec.limits)
        result = zero_shot(self.model, labeled, spec.batch_size, self.device)
        self.model.train(was_training)
        return {"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]}

    def finish(self) -> None:
        """Rank 0: the model file, its MLflow artifact and tags, the last evaluation, the skip counts."""
        if self.rank != 0:
            return
        spec, tracker = self.spec, self.tracker
        url = save_model(self.model, storage.join(run_dir(spec), "model.pt"), spec.model, self.state.step, spec.seed,
                         spec.storage, self.shards.fit)
        if tracker.active:
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "model.pt").write_bytes(storage.read_bytes(url, spec.storage))
                tracker.log_artifact(Path(tmp, "model.pt"), "model")
            tracker.set_tags({"splatclip.model_url": url, "splatclip.backbone": spec.model.name})
            if spec.eval_data:
                tracker.log_metrics(self.evaluate(), step=self.state.step)
        tracker.log_metrics({"skipped." + k: v for k, v in self.skipped.reasons.items()}, step=self.state.step)
        tracker.end()


def train_loop(config: dict) -> None:
    """Ray Train's entry point on every worker: `config` holds the spec, the shards (a ShardSet: their
    sample counts and source image shards included), the MLflow run the driver opened and the queue
    of the driver's progress line."""
    Loop(config["spec"], config["shards"], config["run_id"], config["progress"]).run()
