"""A checkpoint seen without building its model: architecture, input size, feature size and
the fingerprint that identifies its weights.

"The same model" has one rule, `same_model`, on the fingerprint: the same architecture and the
same weight files by name, size and a digest of their content. The spelling of the source (a
relative or absolute path, a released name) and the files' times do not count: a checkpoint
copied elsewhere is the same model. Embed resumes, index builds (--add), Serve's index check and
the exported-graph cache (`ModelInfo.key`) all use it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clip_models

DIGEST_BLOCK = 2**20  # bytes read at each sampled offset of a weight file
DIGEST_BLOCKS = 16  # sampled offsets per file: a finetuned tensor changes some of them; files up
# to DIGEST_BLOCK * DIGEST_BLOCKS bytes are read whole


@dataclass(frozen=True)
class ModelInfo:
    source: str  # what each encoder actor loads
    name: str  # e.g. ViT-B-16@RoBERTa-wwm-ext-base-chinese
    image_size: int
    embed_dim: int
    fingerprint: dict[str, Any]  # identifies the weights (`same_model`); "source" is for messages only

    @property
    def key(self) -> str:
        """A short hash of what identifies the weights: a folder name for what is derived from them."""
        identity = {"name": self.fingerprint["name"], "files": _files(self.fingerprint)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def file_digest(path: str | os.PathLike, size: int) -> str:
    """blake2b of the file, or of DIGEST_BLOCKS evenly spaced blocks of a large one (and its size):
    a few MiB read whatever the checkpoint's size."""
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= DIGEST_BLOCK * DIGEST_BLOCKS:
            digest.update(f.read())
        else:
            step = (size - DIGEST_BLOCK) // (DIGEST_BLOCKS - 1)
            for block in range(DIGEST_BLOCKS):
                f.seek(block * step)
                digest.update(f.read(DIGEST_BLOCK))
    return digest.hexdigest()


def fingerprint(source: str, name: str, path: Path) -> dict[str, Any]:
    """{"source", "name", "files": [[name relative to the checkpoint, size, digest], ...]}."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    entries = []
    for file in files:
        size = file.stat().st_size
        entries.append([str(file.relative_to(path)) if path.is_dir() else file.name, size, file_digest(file, size)])
    return {"source": str(source), "name": name, "files": entries}


def _files(fingerprint: dict[str, Any]) -> list[tuple]:
    return sorted(tuple(entry) for entry in fingerprint.get("files", []))


def same_model(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two fingerprints are of the same weights: the same architecture and the same files
    by name and size, and by digest where both record one. Fingerprints written before digests
    were recorded held [name, size, mtime]: those compare by name and size."""
    if not a or not b or a.get("name") != b.get("name"):
        return False
    files_a, files_b = _files(a), _files(b)
    if [f[:2] for f in files_a] != [f[:2] for f in files_b]:
        return False
    return all(_digest(x) is None or _digest(y) is None or _digest(x) == _digest(y) for x, y in zip(files_a, files_b))


def _digest(entry: tuple) -> str | None:
    return entry[2] if len(entry) > 2 and isinstance(entry[2], str) else None


def inspect_model(source: str, download_root: str | None = None) -> ModelInfo:
    """Read the checkpoint once on the driver: a bad --resume fails here in one line,
    and the decode stage learns the input size without building the model."""
    path = clip_models.resolve(source, download_root)
    state, config, _ = clip_models.read_checkpoint(path, mmap=True)  # shapes only: no need to read the weights
    config = config or clip_models.infer_config(state)
    del state
    return ModelInfo(str(source), config.struct_name(), config.vision.image_size, config.embed_dim,
                     fingerprint(source, config.struct_name(), path))
