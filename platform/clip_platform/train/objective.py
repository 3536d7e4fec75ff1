"""The training objective across workers, as cn_clip's get_loss: features gathered
from every worker (no-grad all_gather with the local features first, or
torch.distributed.nn.all_gather with gradients), then the model library's loss
(`clip_models.contrastive_loss`, bad-record slots masked so batch shapes stay
static) and optional knowledge distillation on image features."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import nn as dist_nn

import clip_models

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


def contrastive(image_features, text_features, logit_scale, valid, aggregate: bool, with_grad: bool,
                teacher_features=None, kd_weight: float = 0.0):
    """(loss, terms) over the global batch of normalised features: terms holds the accuracies
    ("i2t", "t2i") and, with a teacher, the distillation term ("kd_loss", before its weight)."""
    if aggregate:
        image_features = gather(image_features, with_grad)
        text_features = gather(text_features, with_grad)
        valid = gather(valid, False)
        if teacher_features is not None:
            teacher_features = gather(teacher_features, False)
    loss, acc = clip_models.contrastive_loss(image_features, text_features, logit_scale, valid=valid)
    if teacher_features is not None:
        kd_loss = clip_models.distillation_loss(teacher_features[valid], image_features[valid])
        loss = loss + kd_weight * kd_loss
        acc = {**acc, "kd_loss": kd_loss.detach()}
    return loss, acc
