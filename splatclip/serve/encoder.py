"""The model side of serving, shared by the MLflow model and the Ray Serve deployment: a request's
bytes checked and parsed (`parse`), a batch of splat arrays embedded, and the zero-shot classes ranked
(`Encoder`). A payload is refused with the same rules the evaluate job skips a sample by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splatclip import splats
from splatclip.models.backbone import input_size
from splatclip.models.gsclip import GSCLIP
from splatclip.models.zeroshot import class_embeddings
from splatclip.pipelines.samples import splat_problem
from splatclip.platform.specs import ShardLimits

PROBLEMS = {  # splat_problem's reasons, as a client reads them
    "no_live_gaussians": "the splat file holds no Gaussians",
    "too_many_gaussians": "more Gaussians than this encoder accepts",
    "splats_out_of_range": "positions, scales or colors out of range",
}


class BadRequest(ValueError):
    """A payload the encoder refuses; `status` is the HTTP status that says why (400, 413, 415)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse(data: bytes, limits: ShardLimits) -> np.ndarray:
    """The bytes of a splat file (`.splats.npy`, float16 [n, 8]) -> the array, or BadRequest naming
    what is wrong with it."""
    try:
        arr = splats.from_bytes(data, "payload")
    except splats.SplatFormatError as err:
        raise BadRequest(400, f"not a splat file: {err}") from None
    problem = splat_problem(arr, limits)
    if problem == "too_many_gaussians":
        raise BadRequest(413, f"{len(arr)} Gaussians; this encoder accepts at most {limits.max_gaussians}")
    if problem:
        raise BadRequest(400, PROBLEMS[problem])
    return arr


@dataclass
class Answer:
    embedding: list[float]  # [D], unit length
    classes: list[tuple[str, float]]  # the top-k (name, cosine similarity), empty without classes


class Encoder:
    """A trained splat encoder with its class embeddings (when given class names)."""

    def __init__(self, model: GSCLIP, classes: list[str] | None = None, templates: list | None = None,
                 device: str = "cpu", fit: dict | None = None):
        """`classes`: names to rank (none: embeddings only); `templates`: prompt callables name -> text
        (zeroshot.load_templates); `fit`: the fit settings of the splats it was trained on (the model
        file's), which a client fits its images with."""
        if model.encoder != "splat":
            raise ValueError("the model is an RGB model; serving takes a splat encoder")
        self.model, self.device, self.classes, self.fit = model.to(device).eval(), device, classes or [], fit
        self.size = input_size(model.clip)
        self.text = None  # [C, D]
        if self.classes:
            self.text = class_embeddings(model.encode_text, model.tokenizer, self.classes, templates, device).cpu()

    @torch.no_grad()
    def embed(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """[n_i, 8] arrays -> [B, D] unit embeddings, one batch through the encoder."""
        batch = splats.Splats.from_arrays(arrays, self.size, self.size)
        return self.model.encode_splats(batch.params.to(self.device), batch.mask.to(self.device)).float().cpu()

    def answer(self, arrays: list[np.ndarray], top_k: int = 5) -> list[Answer]:
        features = self.embed(arrays)  # [B, D]
        ranked = [[] for _ in arrays]
        if self.text is not None:
            scores, index = (features @ self.text.t()).topk(min(top_k, len(self.classes)), dim=1)  # [B, k]
            ranked = [[(self.classes[j], float(s)) for s, j in zip(row_s, row_i)]
                      for row_s, row_i in zip(scores.tolist(), index.tolist())]
        return [Answer(f.tolist(), r) for f, r in zip(features, ranked)]
