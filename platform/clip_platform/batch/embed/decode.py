"""The embed job's CPU stage: read rows -> model inputs (uint8 pixels, token ids), every row kept."""
from __future__ import annotations

import json

import numpy as np

import clip_models

from ...data import decode_batch
from ...data.records import BadRecord
from .source import IMAGES, MARKER_ROW, Modality


def decode_rows(batch: dict[str, np.ndarray], modality: Modality, image_size: int,
                context_length: int) -> dict[str, np.ndarray]:
    """Read rows -> model inputs, every row kept: records that fail to decode and the
    end-of-shard markers come out with `ok` False (and the reason in `note`), so the
    writer can account for every row of a shard."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    # Images stay uint8 pixels (a quarter of float32's bytes through the object store);
    # the encoder normalises them, with the same float32 arithmetic as cn_clip's transform.
    decoded, bad = decode_batch({modality.id_key: batch[modality.id_key], modality.payload: batch[modality.payload]},
                                clip_models.image_transform(image_size, pixels=True), context_length,
                                (modality.id_key,), todo=batch["row"] != MARKER_ROW)
    out = {key: batch[key] for key in (modality.id_key, "path", "shard", "row")}
    out["note"] = batch["note"].astype(object)
    out["ok"] = decoded["valid"]
    for position, record in bad.items():
        name = str(batch["path"][position])  # a file's or a key's name says more than its hashed id
        named = BadRecord(record.kind, name, record.where, record.detail) if name else record
        out["note"][position] = json.dumps(named.to_dict())
    if modality == IMAGES:
        out["image"] = decoded["image"]
    else:
        out["tokens"] = decoded["tokens"]
        out["num_tokens"] = decoded["num_tokens"]
    return out
