"""The embed job's actor-pool stage: one tower of the model on the chosen backend, decoded rows in,
rows with their normalised features out."""
from __future__ import annotations

import numpy as np

from ...encode.encoder import IMAGE, TEXT, ModelEncoder
from ...ray_context import node_id
from .source import IMAGES, Modality


class EmbedActor(ModelEncoder):
    """The embed job's actor-pool stage: one tower of the model, decoded rows -> rows with their
    normalised features. Each row also says which node encoded it (`node`), for the report."""

    def __init__(self, source: str, modality: Modality, precision: str, threads: int = 0,
                 compile_batch: int = 0, backend: str = "torch"):
        super().__init__(source, (IMAGE if modality == IMAGES else TEXT,), precision, backend, threads, compile_batch)
        self.modality = modality
        self.node = node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        features = np.zeros((len(ok), self.info.embed_dim), np.float32)
        if ok.any():
            if self.modality == IMAGES:
                features[ok] = self.encode_images(batch["image"][ok])
            else:
                features[ok] = self.encode_texts(batch["tokens"][ok], batch["num_tokens"][ok])
        out = {key: batch[key] for key in (self.modality.id_key, "path", "shard", "row", "note")}
        out["ok"], out["feature"] = ok, features
        out["node"] = np.full(len(ok), self.node, object)
        return out
