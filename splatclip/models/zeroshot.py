"""Zero-shot classification: per-class text embeddings averaged over prompt templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splatclip.platform import storage
from splatclip.platform.specs import StorageSpec


def load_classes(source: str, spec: StorageSpec | None = None) -> list[str]:
    """'imagenet' (open_clip's ImageNet-1k names), 'digits' (the example digits' names) or a JSON
    list of class names (path or URL)."""
    if source == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if source == "digits":
        from splatclip.datasets import DIGIT_CLASSES

        return list(DIGIT_CLASSES)
    names = storage.read_json(source, spec)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: expected a non-empty JSON list of class names")
    return names


def load_templates(source: str, spec: StorageSpec | None = None) -> list:
    """'imagenet' (OpenAI's 80 templates), 'digits' (the example digits' captions) or a JSON list of
    strings with '{c}' for the class name. Returns callables name -> prompt."""
    if source == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if source == "digits":
        from splatclip.datasets import DIGIT_TEMPLATES

        texts = DIGIT_TEMPLATES
    else:
        texts = storage.read_json(source, spec)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and "{c}" in t for t in texts):
        raise ValueError(f"{source}: expected a non-empty JSON list of templates containing '{{c}}'")
    return [lambda c, t=t: t.format(c=c) for t in texts]


@torch.no_grad()
def class_embeddings(encode_text, tokenizer, classes: list[str], templates: list, device="cpu"):
    """[C, D]: for each class the normalized mean of its normalized prompt embeddings."""
    out = []
    for name in classes:
        tokens = tokenizer([t(name) for t in templates]).to(device)
        e = F.normalize(encode_text(tokens).float(), dim=-1).mean(0)
        out.append(F.normalize(e, dim=-1))
    return torch.stack(out)


def topk_correct(image_embeddings, class_embeddings_, labels, ks=(1, 5)) -> dict[int, int]:
    """Number of images whose label is among the k most similar classes, for each k."""
    logits = image_embeddings.float() @ class_embeddings_.t()  # [B, C]
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [B, k]
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(1).sum()) for k in ks}
