"""Zero-shot scoring of a model on labeled shards: the evaluate job's measure, and the accuracy curve
the train job logs while it trains."""

from __future__ import annotations

import torch

from splatclip.models.backbone import input_size
from splatclip.models.zeroshot import class_embeddings, load_classes, load_templates, topk_correct
from splatclip.pipelines.samples import Skipped, collate, stream
from splatclip.platform import storage
from splatclip.platform.specs import DEFAULT_LIMITS, ShardLimits, StorageSpec


@torch.no_grad()
def embed(model, data: str, n_classes: int, batch_size: int, spec: StorageSpec | None, device="cpu",
          limits: ShardLimits = DEFAULT_LIMITS):
    """(embeddings [M, D], labels [M], skipped) of every usable labeled sample of the shards."""
    shards, _ = storage.list_shards(data, spec)
    if not shards:
        raise FileNotFoundError(f"no shards match {data}")
    size = input_size(model.clip)
    skipped, feats, labels, pending = Skipped(), [], [], []

    def flush():
        batch = collate(pending, None, size)
        if model.kind == "splat":
            feats.append(model.encode_splats(batch["params"].to(device), batch["mask"].to(device)).cpu())
        else:
            feats.append(model.encode_image(batch["images"].to(device)).cpu())
        labels.append(batch["labels"])
        pending.clear()

    for sample in stream(shards, 0, 1, 0, 0, model.kind, size, spec, skipped, need_text=False, classes=n_classes,
                         limits=limits):
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not feats:
        raise RuntimeError(f"no usable labeled samples in {data} ({dict(skipped.reasons)})")
    return torch.cat(feats), torch.cat(labels), skipped


def zero_shot(model, data, classes_src, templates_src, batch_size, spec=None, device="cpu",
              limits: ShardLimits = DEFAULT_LIMITS) -> dict:
    classes = load_classes(classes_src, spec)
    templates = load_templates(templates_src, spec)
    text = class_embeddings(model.encode_text, model.tokenizer, classes, templates, device).cpu()
    feats, labels, skipped = embed(model, data, len(classes), batch_size, spec, device, limits)
    hits = topk_correct(feats, text, labels, ks=(1, 5))
    n = len(labels)
    return {"top1": hits[1] / n, "top5": hits[5] / n, "images": n, "skipped": dict(skipped.reasons)}
