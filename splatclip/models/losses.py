"""Contrastive (CLIP) loss that is exact under data parallelism, and the distillation loss."""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_local_grad(x):
    """[b, D] on each rank -> [world * b, D]: every rank's rows, where this rank's rows are the
    local tensor itself (so gradients reach the local features, and only them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, 0)


def gather_all(x):
    """[b, ...] on each rank -> [world * b, ...], no gradient (for labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def clip_loss(image_features, text_features, logit_scale, positive_ids=None):
    """Symmetric InfoNCE over the global batch. Features are L2-normalized [b, D] per rank; every rank
    computes the same global loss, and the gradient w.r.t. its local features equals the
    single-process gradient of that loss. (DDP averages parameter gradients over ranks, so the
    trainer multiplies this loss by the world size to keep the global-batch gradient.)

    `positive_ids` [b] (int64, equal for equal captions, or for one class) makes every pair with the
    same id a positive: the target of an image is spread evenly over the texts of its id, instead of
    treating them as negatives. With all ids distinct this is the plain CLIP loss."""
    img = gather_with_local_grad(image_features)
    txt = gather_with_local_grad(text_features)
    logits = logit_scale * img @ txt.t()  # [B, B]
    if positive_ids is None:
        labels = torch.arange(len(img), device=img.device)
    else:
        ids = gather_all(positive_ids.to(img.device))  # [B]
        same = (ids[:, None] == ids[None, :]).to(logits.dtype)  # [B, B], symmetric
        labels = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def distill_loss(student, teacher, normalize: bool = True):
    """MSE between the student and teacher embeddings [b, D], L2-normalized first (`normalize`)."""
    teacher = teacher.to(student.dtype)
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.mse_loss(student, teacher)
