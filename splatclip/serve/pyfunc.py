"""The trained splat encoder as an MLflow model, and its registration.

The model is a pyfunc: its input a DataFrame with a binary column `splats` (each row the bytes of a
splat file, `.splats.npy`), its output a DataFrame with each row's `embedding` (unit length), `label`
and `score` (the top zero-shot class among the train spec's `classes`). Its artifacts
are the run's model.pt, copies of the backbone weights and config file that model.pt names (so that
it loads in a fresh process from the registry alone) and `config.json` (class names, templates,
limits, and the fit settings of the encoder's training splats). The fit settings are also the
model's metadata (`fit` in its MLmodel file), for a client that fits images to send:

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    model.metadata.metadata["fit"]  # {"gaussians": 49, "size": 28, "init": "ink", ...}, or None
    model.predict(pd.DataFrame({"splats": [data, ...]}))
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import torch

from splatclip.platform import storage
from splatclip.platform.specs import ShardLimits, StorageSpec

log = logging.getLogger(__name__)

ARTIFACT = "encoder"  # the model's directory in the run's artifacts
BUILT_IN = ("imagenet", "digits")  # class and template sources the package holds itself


class SplatEncoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from splatclip.models.model_file import load_model
        from splatclip.models.zeroshot import load_templates
        from splatclip.serve.encoder import Encoder

        config = json.loads(Path(context.artifacts["config"]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = {k: context.artifacts[a] for k, a in (("name", "backbone_config"), ("pretrained", "backbone"))
                     if a in context.artifacts}
        model = load_model(context.artifacts["model"], device=device, reference=reference)
        templates = config["templates"] if config["templates"] in BUILT_IN else context.artifacts["templates"]
        self.encoder = Encoder(model, config["classes"], load_templates(templates), device, config.get("fit"))
        self.limits = ShardLimits(max_gaussians=config["max_gaussians"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from splatclip.serve.encoder import parse

        arrays = [parse(bytes(data), self.limits) for data in model_input["splats"]]
        answers = self.encoder.answer(arrays, top_k=1) if arrays else []
        return pd.DataFrame({"embedding": [a.embedding for a in answers], "label": [a.classes[0][0] for a in answers],
                             "score": [a.classes[0][1] for a in answers]})


def log_encoder(client, run_id: str, model_url: str, classes: str, templates: str,
                limits: ShardLimits, spec: StorageSpec | None, register: str) -> int:
    """Write the model file at `model_url` into run `run_id` as an MLflow model (`ARTIFACT`) and
    register it as a new version of `register`; returns that version."""
    from mlflow.models import infer_signature

    from splatclip.models.model_file import read_payload
    from splatclip.models.zeroshot import load_classes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifacts = {"model": tmp / "model.pt", "config": tmp / "config.json"}
        artifacts["model"].write_bytes(storage.read_bytes(model_url, spec))  # read once; the copy is local
        payload = read_payload(str(artifacts["model"]))
        if payload["model"]["encoder"] != "splat":
            raise ValueError(f"{model_url}: an RGB model; the MLflow model serves splat encoders")
        name, pretrained = payload["model"]["name"], payload["model"]["pretrained"]
        if name.endswith(".json") and storage.exists(name, spec):  # a config file, not a model open_clip knows
            artifacts["backbone_config"] = tmp / posixpath.basename(name)  # open_clip names the model by its stem
            artifacts["backbone_config"].write_bytes(storage.read_bytes(name, spec))
        if pretrained and storage.exists(pretrained, spec):  # a file or URL, not an open_clip tag
            artifacts["backbone"] = tmp / "backbone.pt"
            artifacts["backbone"].write_bytes(storage.read_bytes(pretrained, spec))
        names = load_classes(classes, spec)
        if templates not in BUILT_IN:
            artifacts["templates"] = tmp / "templates.json"
            artifacts["templates"].write_text(json.dumps(storage.read_json(templates, spec)))
        fit = payload.get("fit")  # None in a model file written before it was recorded
        artifacts["config"].write_text(json.dumps({"classes": names, "templates": templates,
                                                   "max_gaussians": limits.max_gaussians, "fit": fit}))
        example = pd.DataFrame({"splats": [b"\x93NUMPY"]})  # the column's type; not a model input
        output = pd.DataFrame({"embedding": [[0.0]], "label": ["a"], "score": [0.0]})
        mlflow.pyfunc.save_model(tmp / ARTIFACT, python_model=SplatEncoderModel(),
                                 artifacts={k: str(v) for k, v in artifacts.items()},
                                 signature=infer_signature(example, output), pip_requirements=requirements(),
                                 metadata={"fit": fit})
        client.log_artifacts(run_id, str(tmp / ARTIFACT), ARTIFACT)
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(register)
    except MlflowException as err:  # it exists: a new version of it
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = client.create_model_version(register, f"runs:/{run_id}/{ARTIFACT}", run_id=run_id)
    log.info("registered the encoder as models:/%s/%s", register, version.version)
    return int(version.version)


def requirements() -> list[str]:
    """The packages the model needs, at the versions that wrote it (splatclip itself: this project,
    installed from its repository)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "open_clip_torch", "numpy", "pandas", "mlflow")]
