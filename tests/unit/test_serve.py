"""Serving's model side: what a payload must be, and the MLflow model loading in a fresh process to
the same embeddings and classes as the encoder it was logged from."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from splatclip import splats
from splatclip.models.gsclip import from_open_clip
from splatclip.models.model_file import load_model, save_model
from splatclip.models.zeroshot import load_classes, load_templates
from splatclip.platform.specs import ModelSpec, ServeSpec, ShardLimits
from splatclip.serve.app import load_encoder
from splatclip.serve.deploy import absolute, model_problem
from splatclip.serve.encoder import BadRequest, Encoder, parse
from splatclip.serve.pyfunc import ARTIFACT, log_encoder

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny-vit.json")
SPEC = ModelSpec(name=TINY, latents=8, resampler_layers=2, resampler_width=32, fourier_bands=4)
LIMITS = ShardLimits(max_gaussians=64)


def splat_file(n=20, seed=0) -> bytes:
    g = np.random.default_rng(seed)
    arr = g.random((n, 8)).astype(np.float32)
    arr[:, 2:5] = 0.01 + 0.05 * arr[:, 2:5]
    return splats.to_bytes(arr.astype(np.float16))


def test_a_splat_file_parses_to_its_array():
    arr = parse(splat_file(20), LIMITS)
    assert arr.shape == (20, 8) and arr.dtype == np.float16


def nan_file() -> bytes:
    arr = np.frombuffer(splat_file(5), dtype=np.uint8)  # the .npy bytes: a header, then the values
    data = bytearray(arr.tobytes())
    data[-2:] = np.array([np.nan], dtype=np.float16).tobytes()  # the last value (a color) NaN
    return bytes(data)


@pytest.mark.parametrize("payload, status, words", [
    (b"GIF89a not a splat file", 400, "not a splat file"),
    (b"", 400, "not a splat file"),
    (splat_file(5)[:-7], 400, "truncated"),
    (nan_file(), 400, "NaN"),
    (splat_file(65), 413, "65 Gaussians; this encoder accepts at most 64"),
    (splats.to_bytes(np.zeros((0, 8), np.float16)), 400, "no Gaussians"),
    (splats.to_bytes(np.full((3, 8), 900, np.float16)), 400, "out of range"),
], ids=["gif", "empty", "truncated", "nan", "too-many", "no-gaussians", "out-of-range"])
def test_a_bad_payload_is_refused_naming_what_is_wrong(payload, status, words):
    with pytest.raises(BadRequest) as refused:
        parse(payload, LIMITS)
    assert refused.value.status == status and words in str(refused.value)


@pytest.mark.parametrize("model, words", [
    ("runs/nothing/model.pt", "runs/nothing/model.pt: no such model file"),
    ("models:/name/v1", "expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"),
    ("models:/nobody/latest", "models:/nobody/latest: not in the registry at sqlite:///"),
    ("models:/nobody@champion", "models:/nobody@champion: not in the registry at sqlite:///"),
], ids=["no-file", "malformed", "no-versions", "no-alias"])
def test_the_serve_job_names_a_model_it_cannot_find(tmp_path, monkeypatch, model, words):
    monkeypatch.chdir(tmp_path)
    spec = absolute(ServeSpec(model=model, tracking={"uri": "sqlite:///mlflow.db"}))
    assert words in model_problem(spec)


def test_the_registered_model_loads_in_a_fresh_process_and_answers_as_the_encoder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    backbone = from_open_clip(TINY, spec=SPEC)
    torch.save(backbone.clip.state_dict(), tmp_path / "backbone.pt")
    spec = SPEC.model_copy(update={"pretrained": str(tmp_path / "backbone.pt")})
    model = from_open_clip(TINY, str(tmp_path / "backbone.pt"), spec)
    with torch.no_grad():
        for p in model.splat.parameters():  # "trained" weights, so that loading them is seen
            p.add_(0.01 * torch.randn_like(p))
    fit = {"gaussians": 12, "size": 28, "init": "ink", "prefilter": 0.018}  # how its training splats were fitted
    save_model(model, str(tmp_path / "run" / "model.pt"), spec, step=3, seed=0, fit=fit)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("serve", artifact_location=str(tmp_path / "artifacts")))
    version = log_encoder(client, run.info.run_id, str(tmp_path / "run" / "model.pt"), "digits", "digits", LIMITS,
                          None, "tiny-encoder")
    assert version == 1
    assert "config.json" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, f"{ARTIFACT}/artifacts")}

    files = [splat_file(n, seed) for seed, n in enumerate((12, 20, 7))]
    (tmp_path / "payloads.json").write_text(json.dumps([f.hex() for f in files]))
    script = f"""
import json, mlflow, pandas as pd
mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/tiny-encoder/1")
payloads = [bytes.fromhex(h) for h in json.load(open("payloads.json"))]
out = model.predict(pd.DataFrame({{"splats": payloads}}))
print(json.dumps({{"embedding": [list(map(float, e)) for e in out["embedding"]], "label": list(out["label"]),
                  "metadata": model.metadata.metadata, "fit": model.unwrap_python_model().encoder.fit}}))
"""
    # a fresh process, in another directory: the registry alone, nothing of this test's files
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "payloads.json").write_text((tmp_path / "payloads.json").read_text())
    (tmp_path / "backbone.pt").rename(tmp_path / "moved.pt")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])

    (tmp_path / "moved.pt").rename(tmp_path / "backbone.pt")
    encoder = Encoder(load_model(str(tmp_path / "run" / "model.pt")), load_classes("digits"), load_templates("digits"))
    answers = encoder.answer([parse(f, LIMITS) for f in files], top_k=1)
    np.testing.assert_allclose(served["embedding"], [a.embedding for a in answers], atol=1e-5)
    assert served["label"] == [a.classes[0][0] for a in answers]
    assert served["metadata"] == {"fit": fit} and served["fit"] == fit  # the registry names how to fit for it
    from_file = load_encoder(ServeSpec(model=str(tmp_path / "run" / "model.pt"), classes="digits"), "cpu")
    assert from_file.fit == fit and from_file.classes == load_classes("digits")
