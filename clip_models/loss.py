"""Contrastive (InfoNCE) loss and in-batch accuracy, as cn_clip's training step, and
cn_clip's distillation loss. Gathering features across ranks is the caller's job (the
model never sees ranks): the platform's training objective gathers, then calls these."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     labels: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of image->text and text->image cross-entropy over normalised features.
    `labels[i]` is the text index matching image i (default: the diagonal). `valid` (bool [N])
    masks out the slots of bad records: they are neither queries nor candidates, so a batch
    keeps its static shape. Also returns in-batch accuracies (cn_clip's "Image2Text Acc" /
    "Text2Image Acc") over the valid queries."""
    logits_per_image = logit_scale * image_features @ text_features.t()
    logits_per_text = logits_per_image.t()
    if labels is None:
        labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    if valid is not None and not bool(valid.all()):
        mask = torch.zeros_like(logits_per_image).masked_fill(~valid[None, :], float("-inf"))
        logits_per_image, logits_per_text = logits_per_image + mask, logits_per_text + mask
        logits_per_image, logits_per_text, labels = logits_per_image[valid], logits_per_text[valid], labels[valid]
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():
        acc = {
            "i2t": (logits_per_image.argmax(-1) == labels).float().mean().item(),
            "t2i": (logits_per_text.argmax(-1) == labels).float().mean().item(),
        }
    return loss, acc


def distillation_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """cn_clip's cosineSimilarityLoss: student features resized to the teacher's shape
    (bilinear, so a teacher of another width fits), 1 - mean cosine similarity."""
    resized = F.interpolate(student[None, None], size=teacher.shape, mode="bilinear", align_corners=False)[0, 0]
    return 1 - F.cosine_similarity(teacher, resized, dim=1).mean()
