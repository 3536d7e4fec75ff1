"""Contrastive (InfoNCE) loss and in-batch accuracy, as cn_clip's training step.
Gathering features across ranks is the caller's job (the model never sees ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of image->text and text->image cross-entropy over normalised features.
    `labels[i]` is the text index matching image i (default: the diagonal). Also
    returns in-batch accuracies (cn_clip's "Image2Text Acc" / "Text2Image Acc")."""
    logits_per_image = logit_scale * image_features @ text_features.t()
    logits_per_text = logits_per_image.t()
    if labels is None:
        labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():
        acc = {
            "i2t": (logits_per_image.argmax(-1) == labels).float().mean().item(),
            "t2i": (logits_per_text.argmax(-1) == labels).float().mean().item(),
        }
    return loss, acc
