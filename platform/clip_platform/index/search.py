"""Searching a built index: `open_index(DIR).search(queries, k) -> (scores, ids)`.

The index files are memory-mapped (IVF inverted lists on disk, read through the page
cache), so a process opening a 100 GB index holds its coarse centroids, not its codes.
Index shards are searched in turn and their top-k merged. No Ray here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..batch.faiss_index import search_index
from ..batch.topk import merge_topk
from .workdir import BuildDir


class ServedIndex:
    """A built index, its search parameters those the build tuned (or `params`)."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any]):
        import faiss

        self.directory, self.manifest = Path(directory), manifest
        self.dim, self.ntotal = manifest["dim"], manifest["count"]
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest["layout"] == "ondisk" else faiss.IO_FLAG_MMAP
        self.shards = [faiss.read_index(str(self.directory / shard["index"]), flags) for shard in manifest["shards"]]
        self.set_parameters(manifest["search_parameters"])

    def set_parameters(self, params: dict[str, int]) -> None:
        """FAISS search parameters (nprobe, efSearch, quantizer_efSearch), on every shard."""
        import faiss

        space = faiss.ParameterSpace()
        for shard in self.shards:
            for name, value in params.items():
                space.set_index_parameter(shard, name, value)
        self.params = dict(params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, k] by inner product, in (score desc, id asc) order; slots no
        vector reached (k above what the visited lists hold) have id -1 and score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape}: the index holds {self.dim}-dimensional vectors")
        parts = [search_index(shard, queries, None, k) for shard in self.shards if shard.ntotal]
        return parts[0] if len(parts) == 1 else merge_topk(parts, k)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the finished index in `directory` (jobs/build_index.py's output)."""
    manifest = BuildDir(directory).manifest()
    if manifest is None:
        raise FileNotFoundError(f"{directory} holds no finished index (no manifest.json); build it with "
                                f"jobs/build_index.py")
    return manifest


def open_index(directory: str | os.PathLike) -> ServedIndex:
    return ServedIndex(directory, read_manifest(directory))
