"""Zero-shot scoring of a model on labeled shards: the evaluate job's measure, and the accuracy curve
the train job logs while it trains."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from splatclip.models.backbone import input_size
from splatclip.models.zeroshot import class_embeddings, load_classes, load_templates, topk_correct
from splatclip.pipelines.samples import SampleFormat, ShardSet, Skipped, collate, stream
from splatclip.platform import storage
from splatclip.platform.specs import ShardLimits, StorageSpec


@dataclass(frozen=True)
class LabeledSet:
    """Labeled shards and the words that name their classes: what a zero-shot score is taken on."""

    data: str  # brace pattern of labeled shards (each sample with a .cls)
    classes: str  # 'imagenet', 'digits', a JSON list or a path to one
    templates: str  # likewise, prompt templates with {c}
    storage: StorageSpec | None = None
    limits: ShardLimits = field(default_factory=ShardLimits)
    view: Mapping[str, str] = field(default_factory=dict)  # `images.crop`'s frame, ground, clutter, stroke: as its splats'


@torch.no_grad()
def embed(model, shards: ShardSet, fmt: SampleFormat, batch_size: int, device="cpu"):
    """(embeddings [M, D], labels [M], skipped) of every usable labeled sample of the shards."""
    skipped, feats, labels, pending = Skipped(), [], [], []

    def flush():
        batch = collate(pending, image_size=fmt.image_size)
        if model.encoder == "splat":
            feats.append(model.encode_splats(batch["params"].to(device), batch["mask"].to(device)).cpu())
        else:
            feats.append(model.encode_image(batch["images"].to(device)).cpu())
        labels.append(batch["labels"])
        pending.clear()

    for sample in stream(shards, fmt, skipped):
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not feats:
        raise RuntimeError(f"no usable labeled samples in the {len(shards.urls)} shards ({dict(skipped.reasons)})")
    return torch.cat(feats), torch.cat(labels), skipped


def zero_shot(model, labeled: LabeledSet, batch_size: int, device="cpu") -> dict:
    """Top-1/top-5 of the model against prompts for each class name, on every usable labeled sample."""
    classes = load_classes(labeled.classes, labeled.storage)
    templates = load_templates(labeled.templates, labeled.storage)
    text = class_embeddings(model.encode_text, model.tokenizer, classes, templates, device).cpu()
    urls, _ = storage.list_shards(labeled.data, labeled.storage)
    if not urls:
        raise FileNotFoundError(f"no shards match {labeled.data}")
    fmt = SampleFormat(encoder=model.encoder, image_size=input_size(model.clip), need_text=False, classes=len(classes),
                       limits=labeled.limits, view=labeled.view)
    feats, labels, skipped = embed(model, ShardSet(tuple(urls), labeled.storage), fmt, batch_size, device)
    hits = topk_correct(feats, text, labels, ks=(1, 5))
    n = len(labels)
    return {"top1": hits[1] / n, "top5": hits[5] / n, "images": n, "skipped": dict(skipped.reasons)}
