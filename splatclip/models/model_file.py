"""A trained model as one file: the trainable weights and the reference to the backbone they sit on
(name, pretrained weights, seed), so the frozen rest is rebuilt rather than stored, and, for a splat
encoder, the fit settings of the splats it was trained on (`fit`: a device fits its images the same
way). An RGB model also gets open_clip.pt beside it, a plain open_clip state dict usable as another
model's `pretrained`."""

from __future__ import annotations

import io

import torch

from splatclip.models.gsclip import GSCLIP, from_open_clip
from splatclip.platform import storage
from splatclip.platform.specs import ModelSpec, StorageSpec

MODEL_FORMAT = "splatclip-model/1"


def save_model(model: GSCLIP, url: str, model_spec: ModelSpec, step: int, seed: int,
               spec: StorageSpec | None = None, fit: dict | None = None) -> str:
    """Write the model to `url` (model.pt in a run directory) and return the URL. `fit`: the fit
    settings of its training splats (FitParams' fields), when they came from one recipe."""
    payload = {"format": MODEL_FORMAT, "model": model_spec.model_dump(), "weights": model.trainable_state(),
               "step": step, "seed": seed, "fit": dict(fit) if fit else None}
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(url, buf.getvalue(), spec)
    if model.encoder == "rgb":
        buf = io.BytesIO()
        torch.save(model.clip.state_dict(), buf)
        storage.write_bytes(storage.join(url.rsplit("/", 1)[0], "open_clip.pt"), buf.getvalue(), spec)
    return url


def read_payload(url: str, spec: StorageSpec | None = None, device="cpu") -> dict:
    """The contents of a model file written by `save_model`."""
    payload = torch.load(io.BytesIO(storage.read_bytes(url, spec)), map_location=device, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{url}: not a splatclip model file")
    return payload


def load_model(url: str, spec: StorageSpec | None = None, device="cpu", reference: dict | None = None) -> GSCLIP:
    """A model written by `save_model`: the backbone rebuilt from its reference (name, pretrained
    weights, and the seed, which reproduces a backbone that had no pretrained weights), then the
    trained weights on top. `reference`: fields of the reference replaced, such as the copies of the
    backbone's config and weights an MLflow model carries ({"name": path, "pretrained": path})."""
    return model_from_payload(read_payload(url, spec, device), url, spec, device, reference)


def model_from_payload(payload: dict, url: str, spec: StorageSpec | None = None, device="cpu",
                       reference: dict | None = None) -> GSCLIP:
    """`load_model` of a payload already read (`url` names it in errors)."""
    model_spec = ModelSpec.model_validate({**payload["model"], **(reference or {})})
    torch.manual_seed(payload["seed"])
    model = from_open_clip(model_spec.name, model_spec.pretrained, model_spec, spec, device)
    missing, unexpected = model.load_state_dict(payload["weights"], strict=False)
    if unexpected:
        raise ValueError(f"{url}: weights for parameters the model does not have: {unexpected[:5]}")
    return model.eval()
