"""Training objectives by the name a spec's stage gives (`stages: [{kind: distill}, ...]`).

An objective is one class: its name, which encoders it trains, whether it reads the source images
for a frozen teacher, and its loss on one batch. The train loop looks a stage's objective up here
and never names a loss; a new loss is one class registered below and its name in a spec.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from splatclip.models.backbone import embed_images
from splatclip.models.gsclip import GSCLIP
from splatclip.models.losses import clip_loss, distill_loss

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(cls: type["Objective"]) -> type["Objective"]:
    OBJECTIVES[cls.name] = cls
    return cls


class Objective:
    name: ClassVar[str]
    encoders: ClassVar[tuple[str, ...]] = ("splat", "rgb")  # the encoders (`model.encoder`) it can train
    reads_images: ClassVar[bool] = False  # with `images:` in the spec, its batches carry the source images
    # The loss is one value of the global batch that every rank computes alike: its gradient w.r.t. a
    # rank's own features is the whole gradient, so the loop scales it by the world size before the
    # gradients are averaged over ranks (a per-sample mean averages correctly as it is).
    global_batch: ClassVar[bool] = False

    def __init__(self, teacher: torch.nn.Module | None = None):
        self.teacher = teacher  # a frozen RGB model, given when the spec names source images

    def __call__(self, model: GSCLIP, batch: dict, device: torch.device) -> torch.Tensor:
        raise NotImplementedError


@register
class Distill(Objective):
    """MSE of the splat encoder's image embedding to the teacher's: the teacher embeddings stored in
    the shards (`fit` with `teacher:`), or a frozen teacher's embeddings of the source images."""

    name = "distill"
    encoders = ("splat",)
    reads_images = True

    def __call__(self, model, batch, device):
        params, mask = batch["params"].to(device), batch["mask"].to(device)  # [b, N, 8], [b, N]
        if self.teacher is not None:
            target = embed_images(self.teacher, batch["images"].to(device))  # [b, D]
        elif "teacher" in batch:
            target = batch["teacher"].to(device)  # [b, D]
        else:
            raise RuntimeError("the distill stage needs teacher embeddings in the shards (fit with `teacher:`) "
                               "or the source images (`images:`)")
        return distill_loss(model.splat_features(params, mask), target)


@register
class Contrastive(Objective):
    """CLIP's symmetric InfoNCE of image against caption embeddings over the global batch, against the
    frozen text tower; captions (or classes) that repeat are positives of each other."""

    name = "contrastive"
    global_batch = True

    def __call__(self, model, batch, device):
        if model.kind == "splat":
            image = model.encode_splats(batch["params"].to(device), batch["mask"].to(device))  # [b, D]
        else:
            image = model.encode_image(batch["images"].to(device))  # [b, D]
        text = model.encode_text(batch["tokens"].to(device))  # [b, D]
        return clip_loss(image, text, model.logit_scale, batch["positive_ids"])


def stage_problems(kinds: list[str], encoder: str, images: bool) -> list[str]:
    """What is wrong with a spec's stages, one line each: an unknown objective, one that cannot train
    the encoder, source images that no stage reads."""
    problems = []
    for i, kind in enumerate(kinds):
        if kind not in OBJECTIVES:
            problems.append(f"stages.{i}.kind: {kind!r} is no objective (known: {', '.join(sorted(OBJECTIVES))})")
        elif encoder not in OBJECTIVES[kind].encoders:
            problems.append(f"stages.{i}.kind: {kind} trains the {' or '.join(OBJECTIVES[kind].encoders)} encoder, "
                            f"not {encoder}")
    if images and not any(kind in OBJECTIVES and OBJECTIVES[kind].reads_images for kind in kinds):
        readers = ", ".join(sorted(name for name, cls in OBJECTIVES.items() if cls.reads_images))
        problems.append(f"images: no stage reads the source images (objectives that do: {readers})")
    return problems
