"""Zero-shot classification, cn_clip's way: the one implementation behind jobs/zeroshot.py
and Serve's POST /classify, so both give the same probabilities for the same image, labels
and checkpoint.

A class is the normalised mean of the normalised embeddings of its prompts (each template
with the label in place of `{}`; by default the Chinese set of templates.py); an image's
probabilities are softmax(100 * normalised image feature @ classes), 100 being cn_clip's
fixed zero-shot scale (not the model's learnt one)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import clip_models

from ..data import decode_batch
from .templates import ZH_TEMPLATES, fill

LOGIT_SCALE = 100.0  # cn_clip's fixed scale for zero-shot probabilities
TEXT_BATCH = 256  # prompts encoded per forward pass


def prompts(labels: Sequence[str], templates: Sequence[str] = ZH_TEMPLATES) -> list[str]:
    """Every template filled with every label, label-major, normalised as cn_clip's text
    pipeline does: len(labels) * len(templates) texts."""
    return [clip_models.preprocess_text(fill(t, label)) for label in labels for t in templates]


def class_weights(prompt_features: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[embed_dim, num_labels] from the features of `prompts(labels, templates)`: per label,
    the normalised mean of its normalised prompt features."""
    per_prompt = prompt_features.float().view(num_labels, -1, prompt_features.shape[-1])
    mean = clip_models.normalize_features(per_prompt).mean(dim=1)
    return clip_models.normalize_features(mean).T.contiguous()


def probabilities(image_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, num_labels] class probabilities of image features [N, embed_dim]."""
    return (LOGIT_SCALE * clip_models.normalize_features(image_features.float()) @ weights).softmax(dim=-1)


def class_embeddings(model: clip_models.CLIP, classnames: list[str], templates: tuple[str, ...],
                     context_length: int = 52) -> torch.Tensor:
    """[embed_dim, num_classes]: per class, the normalised mean of its normalised prompt embeddings."""
    texts = prompts(classnames, templates)
    device = next(model.parameters()).device
    features = []
    with torch.no_grad():
        for start in range(0, len(texts), TEXT_BATCH):
            # Padding to the batch's longest prompt gives the same features as padding to 52, faster.
            tokens = clip_models.tokenize(texts[start:start + TEXT_BATCH], context_length, pad_to_longest=True)
            features.append(model.encode_text(tokens.to(device)).float())
    return class_weights(torch.cat(features), len(classnames))


def decode_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """CPU stage: image bytes -> normalised [B, 3, S, S] arrays; undecodable ones are
    flagged (`ok` False, `error` set), not fatal."""
    decoded, bad = decode_batch({"image": batch["image"]}, clip_models.image_transform(image_size))
    errors = np.full(len(decoded["valid"]), "", dtype=object)
    for row, record in bad.items():
        errors[row] = record.detail
    return {"path": batch["image_id"], "label": batch["label"], "image": decoded["image"], "ok": decoded["valid"],
            "error": errors}
