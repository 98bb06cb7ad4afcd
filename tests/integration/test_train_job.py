"""Train and evaluate jobs on real Ray Train workers (gloo on CPU), with MLflow and checkpoints."""

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from faulty_s3 import Fault

from splatclip import datasets, splats
from splatclip.models.backbone import create, embed_images, input_size
from splatclip.models.gsclip import from_open_clip
from splatclip.models.model_file import load_model
from splatclip.fit import job as fit
from splatclip.train import job as train
from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, stream
from splatclip.pipelines.evaluate import run as evaluate
from splatclip.platform import storage
from splatclip.platform.lease import Lease
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import EvalSpec, FitSpec, TrainSpec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "data" / "tiny-vit.json")
SPEC = ROOT / "jobs" / "specs" / "train.local.yaml"
MODEL = [f"model.name={TINY}", "model.latents=8", "model.resampler_layers=1", "model.resampler_width=32",
         "model.fourier_bands=4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ray_local):
    """96 training digits (4 shards: 2 per worker) and 40 test digits fitted into splat shards,
    with the embeddings of a tiny-ViT teacher (weights saved in teacher.pt)."""
    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(1)
    teacher, _ = create(TINY)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    datasets.write_shards(datasets.digits("train", limit=96), f"{root}/src", "train", 24)
    datasets.write_shards(datasets.digits("test", limit=40), f"{root}/src", "test", 40)
    datasets.write_digit_metadata(f"{root}/src")
    for split, pattern in (("train", "{00000..00003}"), ("test", "{00000..00000}")):
        spec = load_spec(FitSpec, None, [
            f"input={root}/src/{split}-{pattern}.tar", f"output={root}/splats-{split}", "fit.gaussians=36",
            "fit.iterations=30", "fit.size=28", "fit.compile=false", "batch_size=32", "tracking.enabled=false",
            f"teacher.model={TINY}", f"teacher.pretrained={root}/teacher.pt"])
        assert fit.run(spec) == 0
    return root


def train_args(root, name, tracking, *extra):
    return [f"data={root}/splats-train/train-{{00000..00003}}.tar", f"storage_path={root}/runs", f"name={name}",
            *MODEL, "model.pretrained=null", "images=null", "eval_data=null",  # the local spec's, for its own chain
            "tracking.register=null",  # likewise (registering is the submitted job's test and the chain's)
            "batch_size=8", "ray.actors=2", "ray.cpus_per_actor=1", f"tracking.uri={tracking}",
            "tracking.experiment=train-tests", *extra]


def test_two_workers_learn_and_checkpoint(digits, tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec(TrainSpec, SPEC, train_args(digits, "learn", uri, "stages=[{kind: distill, epochs: 5, lr: 0.003}]",
                                                 "checkpoint_every=10"))
    with caplog.at_level(logging.DEBUG, logger="splatclip.progress"):
        assert train.run(spec) == 0
    # the driver heard rank 0's steps as they went (at most one a second), the last one with certainty
    steps = [r.progress for r in caplog.records if r.name == "splatclip.progress"]
    assert steps and steps[-1]["done"] == steps[-1]["total"] == 30 and steps[-1]["unit"] == "steps"
    assert [s["done"] for s in steps] == sorted(s["done"] for s in steps)
    run_dir = digits / "runs" / "learn"
    run_id = json.loads((run_dir / "_mlflow_run.json").read_text())["run_id"]
    losses = [m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss/distill")]
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["data_fit.gaussians"] == "36" and params["data_fit.init"] == "structured"  # the splats' fit
    assert len(losses) == 30  # 48 samples per worker / 8 = 6 steps per epoch, 5 epochs
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses

    # only trainable parameters changed: the frozen backbone equals a fresh build with the same seed
    torch.manual_seed(0)
    fresh = from_open_clip(TINY, spec=spec.model)
    trained = load_model(str(run_dir / "model.pt"))
    # the model file names how its training splats were fitted (the fit job's record of their directory)
    recorded = json.loads((digits / "splats-train" / "_fit.json").read_text())["settings"]["fit"]
    assert torch.load(run_dir / "model.pt", weights_only=True)["fit"] == recorded and recorded["gaussians"] == 36
    trainable = fresh.trainable_names(0)
    fresh_state, trained_state = fresh.state_dict(), trained.state_dict()
    for name, weight in fresh_state.items():
        if name in trainable:
            continue
        assert torch.equal(trained_state[name], weight), name
    assert not torch.equal(trained_state["splat.stem.proj.weight"], fresh_state["splat.stem.proj.weight"])

    checkpoints = checkpoint_dirs(run_dir)
    assert 1 <= len(checkpoints) <= 2  # num_to_keep=2
    state = torch.load(checkpoints[-1] / "state.pt", weights_only=True)  # no pickle needed
    assert set(state) >= {"weights", "position"}
    for rank in (0, 1):  # each worker's generators, merged by Ray Train into the one checkpoint directory
        assert {"torch", "python", "numpy"} <= set(torch.load(checkpoints[-1] / f"rng-{rank}.pt", weights_only=True))
    assert state["position"]["step"] == 30 and {"epoch", "batch", "stage", "stage_step", "run_id"} <= set(state["position"])
    assert all(k in trainable or k.startswith("clip.visual.transformer.resblocks") for k in state["weights"])
    assert not any(k.startswith("clip.transformer.") for k in state["weights"])  # no frozen text tower


def test_distill_from_source_images_with_an_rgb_teacher(digits, tmp_path):
    """Given the source image shards, the workers embed the images with the teacher: the targets
    equal the embeddings the fit job stored for the same teacher, and distillation learns them."""
    teacher, _ = create(TINY, str(digits / "teacher.pt"))
    shard, source = str(digits / "splats-train" / "train-00001.tar"), str(digits / "src" / "train-00001.tar")
    got = list(stream(ShardSet((shard,), sources={shard: source}),
                      SampleFormat(image_size=28, source_size=input_size(teacher)), Skipped()))
    live = embed_images(teacher, torch.stack([s["image"] for s in got]))
    stored = torch.from_numpy(np.stack([s["teacher"] for s in got]).astype(np.float32))
    assert len(got) == 24 and (live * stored).sum(1).min() > 0.999  # cosine; fit stored uint8 pixels

    # splat shards fitted without a teacher: the images are the only source of targets
    for i in range(4):
        with write_shard(str(tmp_path / "plain" / f"train-{i:05d}.tar")) as w:
            for s in read_samples(str(digits / "splats-train" / f"train-{i:05d}.tar")):
                w.write({k: v for k, v in s.items() if k != "teacher.npy"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    teacher_args = [f"data={tmp_path}/plain/train-{{00000..00003}}.tar", f"images={digits}/src/train-{{00000..00003}}.tar",
                    f"teacher.model={TINY}", f"teacher.pretrained={digits}/teacher.pt",
                    "stages=[{kind: distill, epochs: 4, lr: 0.003}]"]
    wrong = load_spec(TrainSpec, SPEC, train_args(digits, "no-sources", uri, *teacher_args,
                                                  f"images={digits}/src/test-00000.tar"))
    assert train.run(wrong) == 2  # no source shard has the splat shards' names: stops before training

    spec = load_spec(TrainSpec, SPEC, train_args(digits, "from-images", uri, *teacher_args, "checkpoint_every=100"))
    assert train.run(spec) == 0
    run_id = json.loads((digits / "runs" / "from-images" / "_mlflow_run.json").read_text())["run_id"]
    losses = [m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss/distill")]
    assert len(losses) == 24 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_a_failed_training_exits_1_and_ends_its_mlflow_run_failed(digits, tmp_path):
    """Distillation over shards without teacher embeddings (and no source images) fails in the
    worker; with no restarts allowed the job says so and marks its run FAILED."""
    with write_shard(str(tmp_path / "plain" / "train-00000.tar")) as w:
        for s in read_samples(str(digits / "splats-train" / "train-00000.tar")):
            w.write({k: v for k, v in s.items() if k != "teacher.npy"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec(TrainSpec, SPEC, train_args(digits, "fails", uri, f"data={tmp_path}/plain/train-00000.tar",
                                                "stages=[{kind: distill, epochs: 1}]", "ray.actors=1",
                                                "max_failures=0"))
    assert train.run(spec) == 1
    run_id = json.loads((digits / "runs" / "fails" / "_mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_train_on_s3_checkpoints_there_and_a_rerun_resumes(digits, s3_bucket, tmp_path):
    """Shards, checkpoints and the model all in (moto) S3; the rerun finds the run there."""
    bucket, storage_spec = s3_bucket
    for i in range(4):
        name = f"train-{i:05d}.tar"
        storage.write_bytes(f"{bucket}/splats/{name}", (digits / "splats-train" / name).read_bytes(), storage_spec)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*train_args(digits, "on-s3", uri, "stages=[{kind: distill, epochs: 1}]", "checkpoint_every=2"),
            f"data={bucket}/splats/train-{{00000..00003}}.tar", f"storage_path={bucket}/runs",
            f"storage.endpoint_url={storage_spec.endpoint_url}", "storage.region=us-east-1"]
    spec = load_spec(TrainSpec, SPEC, args)
    assert train.run(spec) == 0
    fs, _ = storage.filesystem(f"{bucket}/runs", storage_spec)
    run_dir = f"{bucket}/runs/on-s3"
    checkpoints = [p for p in fs.ls(run_dir.removeprefix("s3://"))
                   if p.rsplit("/", 1)[-1].startswith("checkpoint_") and fs.isdir(p)]
    assert len(checkpoints) == 2 and fs.exists(f"{checkpoints[-1]}/state.pt")  # num_to_keep=2 of 3
    model = torch.load(io.BytesIO(storage.read_bytes(f"{run_dir}/model.pt", storage_spec)), weights_only=True)
    assert model["step"] == 6 and model["fit"] is None  # the shards came without their directory's fit record
    run_id = storage.read_json(f"{run_dir}/_mlflow_run.json", storage_spec)["run_id"]
    assert train.run(load_spec(TrainSpec, SPEC, args)) == 0  # resumes at the end: nothing trains again
    assert storage.read_json(f"{run_dir}/_mlflow_run.json", storage_spec)["run_id"] == run_id
    assert len(MlflowClient(uri).get_metric_history(run_id, "loss/distill")) == 6


def job_runs(client: MlflowClient, experiment: str) -> list:
    """The experiment's runs, not counting parent runs (`tracking.parent`: the local spec has one)."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if r.data.tags.get("splatclip.group") != "true"]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def run_train_subprocess(args, cwd):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), str(ROOT / "jobs/specs/train.local.yaml"),
           *[f"--set={a}" for a in args]]
    return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def parent(pid: str) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]


def final_step(run_dir: Path) -> int:
    return torch.load(run_dir / "model.pt", weights_only=True)["step"]


def registered_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train has recorded in its snapshot (a directory may be half copied)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, besides: str | None = None) -> str:
    """Until Ray Train records a checkpoint other than `besides`; its directory name."""
    deadline = time.time() + 900  # bounds a hang only: a checkpoint appears within a minute on an idle machine
    while (latest := registered_checkpoint(run_dir)) in (None, besides) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        time.sleep(0.3)
    assert latest not in (None, besides), "no checkpoint appeared"
    return latest


def test_killed_job_reruns_and_a_killed_worker_resumes(digits, tmp_path, kill_job):
    """The whole job killed after its first checkpoint, then rerun; in the rerun one worker killed
    (FailureConfig restarts it). One MLflow run throughout, and the step count of an uninterrupted
    run. (A rerun of a finished job: the S3 test.)"""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = train_args(digits, "resume", uri, "stages.0.epochs=4", "stages.1.epochs=2", "checkpoint_every=4",
                      "stages.0.lr=0.001", "stages.1.lr=0.0005", "max_failures=3")
    run_dir = digits / "runs" / "resume"
    proc = run_train_subprocess(args, tmp_path)
    wait_for_checkpoint(run_dir, proc)
    kill_job(proc)
    first = registered_checkpoint(run_dir)  # another may have been recorded before the kill landed
    assert not (run_dir / "model.pt").exists()
    run_id = json.loads((run_dir / "_mlflow_run.json").read_text())["run_id"]

    rerun = run_train_subprocess(args, tmp_path)
    wait_for_checkpoint(run_dir, rerun, besides=first)
    found = subprocess.run(["pgrep", "-s", str(rerun.pid), "-f", "RayTrainWorker"],  # this job's session
                           capture_output=True, text=True).stdout.split()
    # a worker's loader processes are forks of it, with its command line: kill a worker, not a loader
    workers = [pid for pid in found if parent(pid) not in found]
    assert workers, "no Ray Train worker process found in the job's session"
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = rerun.communicate(timeout=1500)
    assert rerun.returncode == 0, out[-4000:]
    resumed = [int(n) for n in re.findall(r"rank 0 resumes at step (\d+)", out)]  # the workers' log lines
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1], resumed  # from the killed job's, then the rerun's
    assert final_step(run_dir) == 36  # 6 steps per epoch, 4 + 2 epochs: the same as without a failure
    assert json.loads((run_dir / "_mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss/distill") + client.get_metric_history(run_id, "loss/contrastive")
    steps = sorted({m.step for m in history})
    assert steps == list(range(1, 37)), steps  # per stage: 1-24 distill, 25-36 contrastive
    assert len(history) == len(steps)  # no step logged twice: resumed from a checkpoint, metrics sent with them
    assert len(job_runs(client, "train-tests")) == 1  # besides the parent run the local spec names
    assert client.get_run(run_id).info.status == "FINISHED"


def test_ray_job_submit_train_logs_to_mlflow_server(digits, ray_head, mlflow_server, tmp_path):
    address, env = ray_head
    args = train_args(digits, "submitted", mlflow_server, "stages=[{kind: contrastive, epochs: 1}]", "checkpoint_every=100",
                      "tracking.experiment=submitted", "tracking.run_name=submitted-run",
                      "tracking.system_metrics=0.5", "tracking.register=splat-encoder-local")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--", "python", "jobs/train.py", "jobs/specs/train.local.yaml", *[f"--set={a}" for a in args]],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    client = MlflowClient(mlflow_server)
    runs = job_runs(client, "submitted")
    assert [r.info.run_name for r in runs] == ["submitted-run"] and runs[0].data.tags["mlflow.parentRunId"]
    run = runs[0]
    assert run.data.params["model.latents"] == "8" and float(run.data.params["model.trainable_share"]) > 0
    assert len(client.get_metric_history(run.info.run_id, "loss/contrastive")) == 6  # per stage: its own axis
    assert "loss" not in run.data.metrics and 0 <= run.data.metrics["data_wait_fraction"] <= 1
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    assert client.get_experiment_by_name("submitted").tags["mlflow.experimentKind"] == "custom_model_development"
    # the spec registers the encoder (tracking.register): through the server, as an MLflow model
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model", "encoder"}
    (version,) = [v for v in client.search_model_versions("name = 'splat-encoder-local'")
                  if v.run_id == run.info.run_id]
    assert version.source == f"runs:/{run.info.run_id}/encoder"


def test_evaluate_matches_accuracy_by_hand(digits, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec(TrainSpec, SPEC, train_args(digits, "for-eval", uri, "stages=[{kind: contrastive, epochs: 1}]",
                                                "ray.actors=1"))
    assert train.run(spec) == 0
    model_url = str(digits / "runs" / "for-eval" / "model.pt")
    out = tmp_path / "eval.json"
    espec = load_spec(EvalSpec, None, [
        f"data={digits}/splats-test/test-00000.tar", f"checkpoint={model_url}", f"classes={digits}/src/classes.json",
        f"templates={digits}/src/templates.json", f"output={out}", f"tracking.uri={uri}"])
    assert evaluate(espec) == 0
    result = json.loads(out.read_text())

    model = load_model(model_url)
    with torch.no_grad():
        text = []
        for name in datasets.DIGIT_CLASSES:
            prompts = model.tokenizer([t.format(c=name) for t in datasets.DIGIT_TEMPLATES])
            e = model.encode_text(prompts).mean(0)
            text.append(e / e.norm())
        text = torch.stack(text)
        correct = 0
        samples = list(read_samples(str(digits / "splats-test" / "test-00000.tar")))
        for s in samples:
            arr = torch.from_numpy(splats.from_bytes(s["splats.npy"]).astype(np.float32))[None]
            pred = (model.encode_splats(arr) @ text.t()).argmax().item()
            correct += pred == int(s["cls"])
    assert result["splat"]["images"] == len(samples) == 40
    assert result["splat"]["top1"] == pytest.approx(correct / 40)
    assert result["compression"]["ratio_raw"] == pytest.approx(28 * 28 * 3 / (36 * 16), rel=1e-6)
    assert result["fit_differences"] == []  # the test digits were fitted as the training digits

    # splats fitted otherwise: the same figures, and the evaluation says how they differ
    other = tmp_path / "other-fit"
    other.mkdir()
    shutil.copy(digits / "splats-test" / "test-00000.tar", other)
    record = json.loads((digits / "splats-test" / "_fit.json").read_text())
    record["settings"]["fit"]["prefilter"] = 0.05
    (other / "_fit.json").write_text(json.dumps(record))
    espec = espec.model_copy(update={"data": f"{other}/test-00000.tar", "output": str(tmp_path / "other.json")})
    assert evaluate(espec) == 0
    again = json.loads((tmp_path / "other.json").read_text())
    assert again["splat"] == result["splat"] and again["fit_differences"] == ["prefilter: 0.0 in training, 0.05 here"]


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_hostile_splat_shards_cost_samples_not_workers(digits, tmp_path):
    """Each training shard gains samples that would kill a worker (a teacher embedding of the wrong
    shape or NaN, a million Gaussians, values no fit makes, a corrupt array), a duplicate key, a
    reserved member name and a cut tail: the job finishes and counts every one by reason."""
    huge = np.zeros((1_000_000, 8), np.float16)
    huge[:, 2], huge[:, 4] = 0.01, 0.01
    wild = np.zeros((36, 8), np.float16)
    wild[:, 2], wild[:, 4], wild[:, 1] = 0.01, 0.01, 40000.0
    for i in range(4):
        good = list(read_samples(str(digits / "splats-train" / f"train-{i:05d}.tar")))
        teacher = good[0]["teacher.npy"]
        bad = [
            {**good[1], "__key__": "shape", "teacher.npy": npy(np.zeros((3, 4), np.float16))},
            {**good[1], "__key__": "nan", "teacher.npy": npy(np.full(32, np.nan, np.float16))},
            {**good[1], "__key__": "dim", "teacher.npy": npy(np.zeros(7, np.float16))},
            {"__key__": "million", "splats.npy": splats.to_bytes(huge), "txt": b"a digit", "teacher.npy": teacher},
            {"__key__": "wild", "splats.npy": splats.to_bytes(wild), "txt": b"a digit", "teacher.npy": teacher},
            {"__key__": "corrupt", "splats.npy": b"\x93NUMPY\x01\x00junk", "txt": b"a digit", "teacher.npy": teacher},
            {**good[2], "__error__": b"\xff\xfe"},  # the reader's own flag as a member name: dropped, sample kept
            {**good[3]},  # a second sample with the key of the fourth
        ]
        path = tmp_path / "hostile" / f"train-{i:05d}.tar"
        with write_shard(str(path)) as w:
            for s in good[:3] + bad[:6] + [bad[6]] + good[3:] + [bad[7]]:
                w.write({k: v for k, v in s.items() if k not in ("__url__", "__problems__")})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 10_000])  # a cut tail: the last samples are lost
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec(TrainSpec, SPEC, train_args(digits, "hostile", uri, f"data={tmp_path}/hostile/train-{{00000..00003}}.tar",
                                                 "stages=[{kind: distill, epochs: 1, lr: 0.003}]", "checkpoint_every=100",
                                                 "max_failures=0"))  # any crash fails the test
    assert train.run(spec) == 0
    run_id = json.loads((digits / "runs" / "hostile" / "_mlflow_run.json").read_text())["run_id"]
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    for reason in ("bad_teacher", "too_many_gaussians", "splats_out_of_range", "corrupt_splats"):
        assert metrics.get(f"skipped.{reason}", 0) >= 1, (reason, metrics)
    assert metrics["skipped.bad_teacher"] >= 3 and metrics.get("nonfinite_steps", 0) == 0


FAULTS = ("slowdown", "error500", "reset_before", "reset_after", "truncate", "delay")


def upload_splats(digits, bucket, storage_spec):
    for split, names in (("train", [f"train-{i:05d}.tar" for i in range(4)]), ("test", ["test-00000.tar"])):
        for name in names:
            storage.write_bytes(f"{bucket}/splats/{name}", (digits / f"splats-{split}" / name).read_bytes(), storage_spec)


def test_train_and_evaluate_under_storage_faults(digits, s3_bucket, fault_proxy, tmp_path):
    """Shards read, checkpoints written and restored, the model and the results written through S3
    that fails 6% of requests in each of six ways: the planned steps all done once (MLflow holds
    each step once), checkpoints readable, and the evaluate job's numbers those of a clean run."""

    bucket, clean_spec = s3_bucket
    upload_splats(digits, bucket, clean_spec)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*train_args(digits, "faulty", uri, "stages=[{kind: distill, epochs: 1}]", "checkpoint_every=2"),
            f"data={bucket}/splats/train-{{00000..00003}}.tar", f"storage_path={bucket}/runs",
            f"storage.endpoint_url={fault_proxy.url}", "storage.region=us-east-1"]
    fault_proxy.set(*[Fault(kind, 0.06, seconds=0.05) for kind in FAULTS])
    assert train.run(load_spec(TrainSpec, SPEC, args)) == 0
    assert fault_proxy.injected["reset_after"] and fault_proxy.injected["truncate"], fault_proxy.injected
    run_dir = f"{bucket}/runs/faulty"
    model = torch.load(io.BytesIO(storage.read_bytes(f"{run_dir}/model.pt", clean_spec)), weights_only=True)
    assert model["step"] == 6 and model["fit"] is None  # the shards came without their directory's fit record
    fs, _ = storage.filesystem(run_dir, clean_spec)
    checkpoints = sorted(p for p in fs.ls(run_dir.removeprefix("s3://"))
                         if p.rsplit("/", 1)[-1].startswith("checkpoint_") and fs.isdir(p))
    state = torch.load(io.BytesIO(storage.read_bytes(f"s3://{checkpoints[-1]}/state.pt", clean_spec)), weights_only=True)
    assert state["position"]["step"] == 6
    run_id = storage.read_json(f"{run_dir}/_mlflow_run.json", clean_spec)["run_id"]
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss/distill")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == 6
    assert not storage.exists(f"{run_dir}/_lease.json", clean_spec)

    results = []
    for faults in ((), [Fault(kind, 0.06, seconds=0.05) for kind in FAULTS]):
        fault_proxy.set(*faults)
        out = f"{bucket}/eval-{len(faults)}.json"
        espec = load_spec(EvalSpec, None, [
            f"data={bucket}/splats/test-00000.tar", f"checkpoint={run_dir}/model.pt",
            f"classes={digits}/src/classes.json", f"templates={digits}/src/templates.json", f"output={out}",
            "tracking.enabled=false", f"storage.endpoint_url={fault_proxy.url}", "storage.region=us-east-1"])
        assert evaluate(espec) == 0
        results.append(storage.read_json(out, clean_spec))
    assert results[0]["splat"] == results[1]["splat"] and results[0]["splat"]["images"] == 40


def test_train_storage_outage_fails_in_one_line_and_a_second_job_refuses(digits, s3_bucket, fault_proxy,
                                                                          tmp_path, caplog):
    """Checkpoint uploads refused from the start: exit 1 (no restart allowed), one error line
    naming storage, the MLflow run FAILED. A run directory whose lease another job holds: exit 2
    naming that job, before anything is written."""

    bucket, clean_spec = s3_bucket
    upload_splats(digits, bucket, clean_spec)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*train_args(digits, "outage", uri, "stages=[{kind: distill, epochs: 1}]", "checkpoint_every=2"),
            f"data={bucket}/splats/train-{{00000..00003}}.tar", f"storage_path={bucket}/runs", "max_failures=0",
            f"storage.endpoint_url={fault_proxy.url}", "storage.region=us-east-1", "storage.max_attempts=2",
            "storage.call_attempts=1"]
    fault_proxy.set(Fault("error500", 1.0, method="PUT", key=r"/runs/outage/checkpoint_"))
    with caplog.at_level(logging.ERROR):
        assert train.run(load_spec(TrainSpec, SPEC, args)) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("splatclip")]
    assert len(lines) == 1 and "storage" in lines[0] and f"{bucket}/runs/outage" in lines[0], lines
    assert fault_proxy.injected["error500"] >= 2
    assert [r.info.status for r in job_runs(MlflowClient(uri), "train-tests")] == ["FAILED"]

    fault_proxy.set()
    held = Lease(f"{bucket}/runs/held", clean_spec, "train")
    held.acquire()
    try:
        caplog.clear()
        args = [a.replace("name=outage", "name=held") for a in args]
        with caplog.at_level(logging.ERROR):
            assert train.run(load_spec(TrainSpec, SPEC, args)) == 2
        assert f"another job is running on this output: {bucket}/runs/held/_lease.json is held by the train job" \
            in caplog.text
        assert storage.listdir(f"{bucket}/runs/held", clean_spec) == ["_lease.json"]
    finally:
        held.release()

    fault_proxy.set(Fault("reset_before", 1.0))  # storage gone for the evaluate job
    caplog.clear()
    espec = load_spec(EvalSpec, None, [
        f"data={bucket}/splats/test-00000.tar", f"checkpoint={bucket}/runs/held/model.pt",
        f"classes={digits}/src/classes.json", f"output={bucket}/eval.json", f"tracking.uri={uri}",
        f"storage.endpoint_url={fault_proxy.url}", "storage.region=us-east-1", "storage.max_attempts=1",
        "storage.call_attempts=1"])
    with caplog.at_level(logging.ERROR):
        assert evaluate(espec) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [f"the evaluate job failed: storage: list {bucket}/splats/test-00000.tar: EndpointConnectionError: "
                     f'Could not connect to the endpoint URL: "{fault_proxy.url}/{bucket.removeprefix("s3://")}'
                     '/splats/test-00000.tar"'], lines
