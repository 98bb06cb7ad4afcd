"""The fit job: Ray Data turns image-text shards into splat shards.

    shard URLs -> read (tasks: one shard each, images stay encoded)
               -> decode (tasks: bounded decoding, CLIP crop)
               -> fit (actor pool: one batch of images per optimizer step, optional teacher; each
                  actor writes its batches as parts and commits the shards they complete)

The CPU stages are in `fit/stages.py`, the fitting actor in `fit/actor.py`, the distributed commit
in `fit/parts.py`, the records and summary in `fit/report.py`, the output layout in
`pipelines/layout.py`. Each input shard becomes one output shard of the same name; its record goes
to `_stats/NAME.json` before the tar is committed, so a committed tar always has its record. A rerun
skips committed shards and the samples earlier parts hold (after removing what a killed run's
unfinished writes left in `_parts`), and refuses (exit 2) an output made with other fit settings
unless the spec says `overwrite`. Inputs are checked before anything is written: a URL listed twice
is read once, and two inputs with one output name stop the job (exit 2). Bad samples are recorded
with key and reason and the job goes on; the exit status is 1 only past the failure budget (or when
shards were left unfinished).
"""

from __future__ import annotations

import logging
import os
import time

from splatclip.pipelines import layout
from splatclip.fit.report import over_budget, report, summarize
from splatclip.fit.actor import FitActor
from splatclip.fit.parts import sweep
from splatclip.fit.stages import decode_batch, read_shard
from splatclip.pipelines.job import Job
from splatclip.platform import lease, storage
from splatclip.platform.progress import Meter
from splatclip.platform.runtime import actor_request, pool_size, ray_options
from splatclip.platform.secrets import redact
from splatclip.platform.specs import FitSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger(__name__)
RUN_FILE = "_mlflow_run.json"  # the MLflow run of the output, for a rerun to reopen


def unique_inputs(shards: list[str]) -> tuple[list[str], list[str]]:
    """(shards with repeats removed, in order; problems: two inputs that would write one output)."""
    unique = list(dict.fromkeys(shards))
    if len(unique) < len(shards):
        log.warning("%d input URLs were listed more than once; each is read once", len(shards) - len(unique))
    by_name: dict[str, str] = {}
    clashes = []
    for url in unique:
        name = layout.shard_name(url)
        if name in by_name:
            clashes.append(f"input shards {redact(by_name[name])} and {redact(url)} would both write "
                           f"{name}; give them distinct file names or separate outputs")
        by_name.setdefault(name, url)
    return unique, clashes


def fit_settings(spec: FitSpec) -> dict:
    """The parts of a spec that change what a fitted sample holds (not how fast it is made)."""
    fit = spec.fit.model_dump(exclude=layout.SPEED_ONLY)
    teacher = spec.teacher.model_dump() if spec.teacher else None
    return {"fit": fit, "teacher": teacher}


def planted_links(spec: FitSpec, shards: list[str]) -> list[str]:
    """One problem line for each place the job will write inside a local output that is a symbolic
    link (its records, each shard, its record and its parts folder, the parts already in it): the job
    never writes, renames or removes anything through one."""
    if not storage.is_local(spec.output):
        return []
    places = [storage.join(spec.output, name) for name in (layout.SETTINGS, layout.SUMMARY, storage.SUCCESS,
                                                             RUN_FILE, lease.NAME, "_parts", "_stats")]
    for shard in shards:
        parts = layout.parts_dir(spec.output, shard)
        places += [layout.output_url(spec.output, shard), layout.stats_url(spec.output, shard), parts]
        places += [storage.join(parts, name) for name in storage.listdir(parts)] if os.path.isdir(parts) else []
    problems = set()
    for url in places:
        try:
            storage.check_no_links(url, spec.output)
        except storage.LinkError as err:
            problems.add(str(err))
    return sorted(problems)


def prepare_output(spec: FitSpec, shards: list[str]) -> list[str]:
    """Check the output's fit settings against the spec's and record them; remove a stale success
    marker. Returns the problems that stop the job (exit 2); with `overwrite` the shards of these
    inputs that were made with other settings are deleted instead."""
    url = storage.join(spec.output, layout.SETTINGS)
    now = fit_settings(spec)
    before = layout.read_settings(spec.output, spec.storage)
    changes = layout.settings_changes(before, now) if before is not None else []
    if changes and not spec.overwrite:
        return [f"output {redact(spec.output)} was fitted with other settings ({c}); set overwrite: true to refit "
                "it, or choose another output" for c in changes]
    success = storage.join(spec.output, storage.SUCCESS)
    if storage.exists(success, spec.storage):
        storage.remove(success, spec.storage, spec.output)
    if changes:
        log.warning("overwrite: deleting the shards of %s fitted with other settings", redact(spec.output))
        for shard in shards:
            for target in (layout.output_url(spec.output, shard), layout.stats_url(spec.output, shard)):
                if storage.exists(target, spec.storage):
                    storage.remove(target, spec.storage, spec.output)
    if changes or before is None:
        storage.write_json(url, {"settings": now}, spec.storage, spec.output)
    return []


class Progress:
    """What a user watches while the job runs: shards committed out of those to do, images done and
    the rate (`platform.progress`: a line in the log every `every` seconds), and the same as MLflow
    metrics."""

    def __init__(self, shards: int, tracker: Tracker, every: float = 10.0):
        self.tracker, self.every = tracker, every
        self.meter = Meter("fit", "shards", shards, every)
        self.start = self.last = time.perf_counter()
        self.parts = self.committed = self.images = self.fitted = self.refitted = 0
        self.refused: set[str] = set()  # parts not written: a link where they would go

    def add(self, row: dict) -> None:
        self.parts += 1
        if row["refused"]:
            self.refused.add(row["refused"])
        self.committed += int(row["committed"])
        self.images += int(row["images"])
        self.fitted += int(row["fitted"])
        self.refitted += int(row["refitted"])
        self.meter.update(self.committed, self.note())
        if time.perf_counter() - self.last >= self.every:
            self.report()

    def note(self) -> str:
        return f"{self.images} images done ({self.fitted} fitted), {self.rate():.1f} images/s"

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def report(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        if final:
            log.info("done: %d of %d shards committed, %s", self.committed, self.meter.total, self.note())
        self.tracker.log_metrics({"progress/shards_committed": self.committed, "progress/images_done": self.images,
                                  "progress/images_fitted": self.fitted, "progress/images_per_second": self.rate()},
                                 step=self.parts)


# Decode tasks: half a CPU and the memory of the largest image they may hold (max_image_pixels RGB,
# its crop and PIL's copy). Their resources differ from the fitting actors' (Ray Data fuses stages
# whose resources are equal), so decoding stays on CPU tasks that run on any node, CPU-only ones
# included, beside the actors rather than inside them.
DECODE_TASK = {"CPU": 0.5, "memory": 1 << 30}
IN_FLIGHT = 3  # batches per fitting actor: the one it fits and two waiting


def build_dataset(spec: FitSpec, todo: list[str], actor: dict[str, float], decode: dict[str, float]):
    """The pipeline over the shards to do; `actor` and `decode` are the fitting actors' and the
    decode tasks' requests, as the cluster check fitted them."""
    import ray

    lo, hi = pool_size(spec.ray)
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=max(1, len(todo)))
    ds = ds.flat_map(read_shard, fn_kwargs={"spec": spec})
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": spec.fit.size, "limits": spec.limits, **layout.view_of(spec.fit)},
                        batch_size=spec.batch_size, **ray_options(decode))
    # The pool starts at `ray.actors` (never at one actor that the autoscaler grows slowly) and each
    # actor has IN_FLIGHT batches sent to it (one fitting, the rest waiting), so it never waits on
    # a decode task between batches, while no actor holds more than that.
    pool = ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=lo,
                                      max_tasks_in_flight_per_actor=IN_FLIGHT)
    return ds.map_batches(FitActor, fn_constructor_kwargs={"spec": spec}, batch_size=spec.batch_size,
                          compute=pool, **ray_options(actor))


class FitJob(Job):
    name = "fit"
    inputs = ("input",)
    uses_ray = True

    def check(self) -> list[str]:
        spec, problems = self.spec, []
        self.start = time.perf_counter()
        shards, self.missing = self.shards(spec.input, "input", problems)
        if problems:
            return problems
        self.shard_list, problems = unique_inputs(shards)
        if spec.teacher is not None:
            from splatclip.models.backbone import missing_weights  # imports open_clip: only when a teacher is named

            if missing_weights(spec.teacher.pretrained):
                problems.append(f"teacher.pretrained {spec.teacher.pretrained}: no such file")
        return problems or planted_links(spec, self.shard_list)

    def requests(self) -> dict[str, tuple[dict[str, float], int]]:
        return {"a fitting actor": (actor_request(self.spec.ray), pool_size(self.spec.ray)[0]),
                "a decode task": (DECODE_TASK, 1)}

    def cluster_paths(self) -> dict[str, str]:
        spec = self.spec
        paths = {"input": spec.input, "output": spec.output}
        if spec.teacher is not None and spec.teacher.pretrained and os.path.exists(spec.teacher.pretrained):
            paths["teacher.pretrained"] = spec.teacher.pretrained
        return paths

    def lease_dir(self) -> str:
        return self.spec.output

    def prepare(self) -> list[str]:
        spec = self.spec
        problems = prepare_output(spec, self.shard_list)
        if not problems:
            self.todo = [s for s in self.shard_list if not storage.exists(layout.output_url(spec.output, s), spec.storage)]
            stale = sweep(spec, self.shard_list, set(self.shard_list) - set(self.todo))
            if stale:
                log.info("removed %d files a killed run left in %s/_parts", stale, redact(spec.output))
            log.info("%d input shards: %d already done, %d to fit", len(self.shard_list),
                     len(self.shard_list) - len(self.todo), len(self.todo))
        return problems

    def run_file(self) -> str:
        return storage.join(self.spec.output, RUN_FILE)

    def needs_ray(self) -> bool:
        return bool(self.todo)  # a rerun with every shard committed only writes the summary

    def body(self, tracker: Tracker) -> int:
        spec, shards = self.spec, self.shard_list
        progress = Progress(len(self.todo), tracker)
        if self.todo:
            dataset = build_dataset(spec, self.todo, self.placed["a fitting actor"], self.placed["a decode task"])
            for row in dataset.iter_rows():
                progress.add(row)
            progress.report(final=True)
            tracker.log_text(dataset.stats(), "ray_data_stats.txt")
        records, unfinished = [], []
        for s in shards:
            url = layout.stats_url(spec.output, s)
            record = storage.read_json(url, spec.storage) if storage.exists(url, spec.storage) else None
            if record and (record["status"] == "unreadable" or storage.exists(layout.output_url(spec.output, s),
                                                                               spec.storage)):
                records.append(record)
            else:
                unfinished.append(s)
        summary = summarize(records, self.missing, unfinished, time.perf_counter() - self.start,
                            pool_size(spec.ray)[1])
        summary["images_this_run"] = progress.images
        summary["batches_refitted"] = progress.refitted  # fitted twice: Ray resent them after losing an actor or node
        problems = over_budget(summary, spec) + sorted(progress.refused)
        summary["ok"] = not problems
        summary["problems"] = problems
        storage.write_json(storage.join(spec.output, layout.SUMMARY), summary, spec.storage, spec.output)
        if not problems:
            storage.mark_success(spec.output, {"shards": [layout.shard_name(s) for s in shards],
                                               "summary": layout.SUMMARY}, spec.storage)
        report(summary, spec, tracker, shards)
        for p in problems:
            log.error("fit job failed: %s", p)
        return 0 if not problems else 1


def run(spec: FitSpec) -> int:
    return FitJob(spec).run()
