"""Training objectives by the name a spec's stage gives (`stages: [{kind: distill}, ...]`).

An objective is one class: its name, which encoders it trains, whether it reads the source images
for a frozen teacher, its own settings (a pydantic model, `Settings`, filled from the stage's
`options:`), and its loss on one batch. The train loop looks a stage's objective up here and never
names a loss; a new loss is one class registered below and its name in a spec.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splatclip.models.augment import Augment, augment_images, augment_splats, draw
from splatclip.models.backbone import embed_images, patch_tokens
from splatclip.models.gsclip import GSCLIP, through_vit
from splatclip.models.losses import clip_loss, distill_loss

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(cls: type["Objective"]) -> type["Objective"]:
    OBJECTIVES[cls.name] = cls
    return cls


class NoSettings(BaseModel):
    """An objective's settings (`stages.N.options`): unknown keys and non-finite numbers refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Objective:
    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]] = NoSettings
    encoders: ClassVar[tuple[str, ...]] = ("splat", "rgb")  # the encoders (`model.encoder`) it can train
    reads_images: ClassVar[bool] = False  # with `images:` in the spec, its batches carry the source images
    # The loss is one value of the global batch that every rank computes alike: its gradient w.r.t. a
    # rank's own features is the whole gradient, so the loop scales it by the world size before the
    # gradients are averaged over ranks (a per-sample mean averages correctly as it is).
    global_batch: ClassVar[bool] = False

    def __init__(self, settings: BaseModel | None = None, teacher: torch.nn.Module | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.teacher = teacher  # a frozen RGB model, given when the spec names source images

    def __call__(self, model: GSCLIP, batch: dict, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def option_problems(cls, settings: BaseModel, encoder: str, images: bool) -> list[str]:
        """What valid settings cannot do with this encoder and data, one line each."""
        return []


AUGMENT = Field(None, description="Random transforms per sample (splatclip.models.augment.Augment: rotate, scale, "
                "shift, blur, gain, stroke, reframe); on splats exact, never refitted.")


def splat_augment_problems(augment: Augment | None) -> list[str]:
    if augment is not None and augment.stroke > 0:
        return ["options.augment.stroke: a change of stroke width has no exact form on splats; "
                "it augments the RGB encoder's images only"]
    return []


class DistillSettings(NoSettings):
    normalize: bool = Field(True, description="Compare L2-normalized embeddings (the method's choice); false: "
                            "the raw embeddings, which also matches their norms.")
    augment: Augment | None = AUGMENT
    tokens: float = Field(0.0, ge=0, le=100, description="Weight of a second term: the student's tokens against "
                          "the teacher's patch tokens (patch embedding plus position), as the ViT's blocks take "
                          "them, in mean squared error relative to the teacher's; needs as many latents as the "
                          "teacher has patches, and the source images (`images:`).")


class ContrastiveSettings(NoSettings):
    augment: Augment | None = AUGMENT


@register
class Distill(Objective):
    """MSE of the splat encoder's image embedding to the teacher's: the teacher embeddings stored in
    the shards (`fit` with `teacher:`), or a frozen teacher's embeddings of the source images."""

    name = "distill"
    encoders = ("splat",)
    reads_images = True
    Settings = DistillSettings

    @classmethod
    def option_problems(cls, settings, encoder, images):
        problems = splat_augment_problems(settings.augment)
        if settings.augment is not None and not images:
            problems.append("options.augment: the stored teacher embeddings are of the untransformed images; "
                            "augmenting distillation needs the source images (`images:`), which the teacher "
                            "embeds after the same transform as the splats")
        if settings.tokens > 0 and not images:
            problems.append("options.tokens: the teacher's patch tokens come from the source images (`images:`); "
                            "the shards' stored teacher embeddings do not hold them")
        return problems

    def __call__(self, model, batch, device):
        params, mask = batch["params"].to(device), batch["mask"].to(device)  # [b, N, 8], [b, N]
        reframe = None  # [b]: the zoom after the model's framing, when augmented
        if self.teacher is not None:
            images = batch["images"].to(device)  # [b, 3, S, S]
            if self.settings.augment is not None:  # one transform for the student's splats and the teacher's image
                d = draw(self.settings.augment, len(params), device)
                params, images, reframe = augment_splats(params, d), augment_images(images, d), d.reframe
            view = model.view(images, reframe)  # the image as the student sees it
            target = embed_images(self.teacher, view)  # [b, D]
            want = patch_tokens(self.teacher, view) if self.settings.tokens > 0 else None  # [b, L, width]
        elif "teacher" in batch:
            target, want = batch["teacher"].to(device), None  # [b, D]
        else:
            raise RuntimeError("the distill stage needs teacher embeddings in the shards (fit with `teacher:`) "
                               "or the source images (`images:`)")
        tokens = model.splat_tokens(params, mask, reframe)  # [b, L, width]
        loss = distill_loss(through_vit(model.clip.visual, tokens), target, self.settings.normalize)
        if want is None:
            return loss
        if tokens.shape != want.shape:
            raise ValueError(f"options.tokens: the student makes {tokens.shape[1]} tokens (model.latents), "
                             f"the teacher's image tower {want.shape[1]} patches")
        return loss + self.settings.tokens * F.mse_loss(tokens, want) / want.pow(2).mean()

@register
class Contrastive(Objective):
    """CLIP's symmetric InfoNCE of image against caption embeddings over the global batch, against the
    frozen text tower; captions (or classes) that repeat are positives of each other."""

    name = "contrastive"
    global_batch = True
    Settings = ContrastiveSettings

    @classmethod
    def option_problems(cls, settings, encoder, images):
        return splat_augment_problems(settings.augment) if encoder == "splat" else []

    def __call__(self, model, batch, device):
        augment = self.settings.augment
        d = None if augment is None else draw(augment, len(batch["tokens"]), device)  # one transform per sample
        reframe = None if d is None else d.reframe  # [b]
        if model.encoder == "splat":
            params = batch["params"].to(device)  # [b, N, 8]
            params = params if d is None else augment_splats(params, d)
            image = model.encode_splats(params, batch["mask"].to(device), reframe)  # [b, D]
        else:
            images = batch["images"].to(device)  # [b, 3, S, S]
            images = images if d is None else augment_images(images, d)
            image = model.encode_image(images, reframe)  # [b, D]
        text = model.encode_text(batch["tokens"].to(device))  # [b, D]
        return clip_loss(image, text, model.logit_scale, batch["positive_ids"])


def settings(kind: str, options: dict[str, Any]) -> BaseModel:
    """The objective's settings from a stage's `options`; raises pydantic's ValidationError."""
    return OBJECTIVES[kind].Settings.model_validate(options)


def stage_problems(stages: list, encoder: str, images: bool, framed: bool = False) -> list[str]:
    """What is wrong with a spec's stages (each with `kind` and `options`), one line each: an unknown
    objective, one that cannot train the encoder, options it does not take, a zoom after a framing the
    model does not do (`framed`: model.canonical_spread is set), source images that no stage reads."""
    problems = []
    kinds = [stage.kind for stage in stages]
    for i, stage in enumerate(stages):
        kind = stage.kind
        if kind not in OBJECTIVES:
            problems.append(f"stages.{i}.kind: {kind!r} is no objective (known: {', '.join(sorted(OBJECTIVES))})")
            continue
        if encoder not in OBJECTIVES[kind].encoders:
            problems.append(f"stages.{i}.kind: {kind} trains the {' or '.join(OBJECTIVES[kind].encoders)} encoder, "
                            f"not {encoder}")
        try:
            options = settings(kind, stage.options)
        except ValidationError as err:
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"])
                problems.append(f"stages.{i}.options.{where}: {e['msg']} ({kind} takes "
                                f"{', '.join(OBJECTIVES[kind].Settings.model_fields) or 'no options'})")
            continue
        problems += [f"stages.{i}.{line}" for line in OBJECTIVES[kind].option_problems(options, encoder, images)]
        augment = getattr(options, "augment", None)
        if augment is not None and augment.reframe > 1 and not framed:
            problems.append(f"stages.{i}.options.augment.reframe: a zoom after the model's framing by its ink, which "
                            "this model does not do; set model.canonical_spread")
    if images and not any(kind in OBJECTIVES and OBJECTIVES[kind].reads_images for kind in kinds):
        readers = ", ".join(sorted(name for name, cls in OBJECTIVES.items() if cls.reads_images))
        problems.append(f"images: no stage reads the source images (objectives that do: {readers})")
    return problems
