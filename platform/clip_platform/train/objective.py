"""The training objective across workers, as cn_clip's get_loss: features gathered
from every worker (no-grad all_gather with the local features first, or
torch.distributed.nn.all_gather with gradients), symmetric InfoNCE, optional
knowledge distillation on image features. Slots of bad records (valid=False)
are masked out, so batch shapes stay static."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import nn as dist_nn

from .engine import world


def gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    rank, world_size = world()
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(dist_nn.all_gather(x), dim=0)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    # Every worker computes the same global loss, but its gradient reaches only its own
    # features, and data parallelism then averages: the features' gradient would be 1/W
    # of the full batch's (as in cn_clip). Same value, W x gradient: a run then equals one
    # worker on the global batch, whatever the number of workers.
    local = x + (world_size - 1) * (x - x.detach()) if x.requires_grad else x
    return torch.cat([local] + parts[:rank] + parts[rank + 1:])  # local first, as cn_clip


def kd_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """cn_clip's cosineSimilarityLoss: student resized to the teacher's shape, 1 - mean cosine."""
    resized = F.interpolate(student[None, None], size=teacher.shape, mode="bilinear", align_corners=False)[0, 0]
    return 1 - F.cosine_similarity(teacher, resized, dim=1).mean()


def contrastive(image_features, text_features, logit_scale, valid, aggregate: bool, with_grad: bool,
                teacher_features=None, kd_weight: float = 0.0):
    """(loss, {"i2t": acc, "t2i": acc}) over the global batch of normalised features."""
    if aggregate:
        image_features = gather(image_features, with_grad)
        text_features = gather(text_features, with_grad)
        valid = gather(valid, False)
        if teacher_features is not None:
            teacher_features = gather(teacher_features, False)
    logits_per_image = logit_scale * image_features @ text_features.t()
    logits_per_text = logits_per_image.t()
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    if not bool(valid.all()):
        mask = torch.zeros_like(logits_per_image).masked_fill(~valid[None, :], float("-inf"))
        logits_per_image, logits_per_text = logits_per_image + mask, logits_per_text + mask
        logits_per_image, logits_per_text, labels = logits_per_image[valid], logits_per_text[valid], labels[valid]
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    if teacher_features is not None:
        loss = loss + kd_weight * kd_loss(teacher_features[valid], image_features[valid])
    with torch.no_grad():
        acc = {"i2t": (logits_per_image.argmax(-1) == labels).float().mean().item(),
               "t2i": (logits_per_text.argmax(-1) == labels).float().mean().item()}
    return loss, acc
