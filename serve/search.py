"""Search over image features held in memory (exact inner-product top-k)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Index:
    """Normalised image features in memory: exact inner-product top-k."""

    def __init__(self, path: str, metadata: str | None):
        from clip_platform.batch.features import read_features

        features = read_features(path, "image_id")
        vectors = features.vectors.astype(np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        self.ids = features.ids
        self.metadata = {}
        if metadata:
            for line in Path(metadata).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.metadata[int(record["image_id"])] = record

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        scores = self.vectors @ query
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((self.ids[top], -scores[top]))]  # score desc, then id: stable results
        return [{"id": int(self.ids[i]), "score": float(scores[i]), **self._meta(int(self.ids[i]))} for i in top]

    def _meta(self, image_id: int) -> dict:
        meta = self.metadata.get(image_id)
        return {"metadata": meta} if meta else {}
