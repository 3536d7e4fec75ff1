"""A checkpoint seen without building its model: architecture, input size, feature size and
the fingerprint that identifies its weights (embed resumes, index manifests, Serve's index
check and the exported-graph cache all compare it)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import clip_models


@dataclass(frozen=True)
class ModelInfo:
    source: str  # what each encoder actor loads
    name: str  # e.g. ViT-B-16@RoBERTa-wwm-ext-base-chinese
    image_size: int
    embed_dim: int
    fingerprint: dict[str, Any]  # identifies the weights, so a resume never mixes two models

    @property
    def key(self) -> str:
        """A short hash of the fingerprint: a folder name for what is derived from these weights."""
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:20]


def inspect_model(source: str, download_root: str | None = None) -> ModelInfo:
    """Read the checkpoint once on the driver: a bad --resume fails here in one line,
    and the decode stage learns the input size without building the model."""
    path = clip_models.resolve(source, download_root)
    state, config, _ = clip_models.read_checkpoint(path, mmap=True)  # shapes only: no need to read the weights
    config = config or clip_models.infer_config(state)
    del state
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    fingerprint = {"source": str(source), "name": config.struct_name(),
                   "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]}
    return ModelInfo(str(source), config.struct_name(), config.vision.image_size, config.embed_dim, fingerprint)
