"""Searching a built index: `open_index(DIR)` is an `IndexSearcher` (searcher.py's interface):
`.search(queries, k) -> (scores, ids)`, `.lookup(ids)`, `.vectors(ids)`.

The index files are memory-mapped (IVF inverted lists on disk, read through the page
cache), so a process opening a 100 GB index holds its coarse centroids, not its codes.
Index shards are searched in turn and their top-k merged (`open_index(DIR, shards=[...])`
opens some of them, for a search replica). With re-ranking (a tuned search parameter),
k x rerank candidates are re-scored against the stored vectors. Removed ids are skipped
inside FAISS's scan (an id selector), so they cost no result slots. No Ray here.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metadata import Metadata
from .searcher import FaissShard, Searcher, fan_out
from .topk import sort_rows
from .vectors import VectorStore
from .workdir import BuildDir

FAISS_PARAMETERS = ("nprobe", "efSearch", "quantizer_efSearch")


class IndexSearcher(Searcher):
    """A built index (or some of its shards): a `FaissShard` per index shard, fanned out and
    merged, with the id table (lookup), the stored vectors (vectors, re-ranking) and the removed
    ids skipped. Its search parameters are those the build tuned (or set with `set_parameters`)."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any], shards: Sequence[int] | None = None):
        import faiss

        self.directory, self.manifest = Path(directory), manifest
        self.dim, self.ntotal = manifest["dim"], manifest["count"]
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest["layout"] == "ondisk" else faiss.IO_FLAG_MMAP
        self.shard_numbers = list(range(len(manifest["shards"]))) if shards is None else list(shards)
        with _quiet_stdout():  # FAISS prints a line per on-disk index it opens
            self.shards = [FaissShard(faiss.read_index(str(self.directory / manifest["shards"][n]["index"]), flags))
                           for n in self.shard_numbers]
        self.metadata = Metadata(self.directory, manifest["metadata"])
        stored = manifest.get("vectors")
        self.store = VectorStore(self.directory, stored["segments"]) if stored else None
        removed = manifest.get("removed")
        self.removed = np.load(self.directory / removed["file"]) if removed else np.zeros(0, np.int64)
        self.set_parameters(manifest["search_parameters"])

    def set_parameters(self, params: dict[str, int]) -> None:
        """FAISS search parameters (nprobe, efSearch, quantizer_efSearch) on every shard, and
        `rerank` (candidates re-scored per result, 0: none)."""
        import faiss

        space = faiss.ParameterSpace()
        for shard in self.shards:
            for name, value in params.items():
                if name in FAISS_PARAMETERS:
                    space.set_index_parameter(shard.index, name, value)
        self.params = dict(params)
        self.rerank = int(params.get("rerank", 0)) if self.store is not None else 0
        selector = _selector_parameters(self.removed, self.params) if len(self.removed) else None
        for shard in self.shards:
            shard.params = selector

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, k] by inner product, in (score desc, id asc) order; slots no
        vector reached (k above what the visited lists hold) have id -1 and score -inf."""
        queries = self.check_queries(queries)
        fetch = k * max(1, self.rerank)
        scores, ids = fan_out(self.shards, queries, fetch)
        if self.rerank:
            scores = self._exact_scores(queries, ids)
        return sort_rows(scores, ids, k) if self.rerank or scores.shape[1] > k else (scores, ids)

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        found, vectors = self.vectors(ids.reshape(-1))
        scores = np.einsum("nkd,nd->nk", vectors.reshape(*ids.shape, self.dim), queries)
        return np.where(found.reshape(ids.shape), scores, -np.inf).astype(np.float32)

    @property
    def has_vectors(self) -> bool:
        """Whether the index keeps its vectors (vectors(), re-ranking): built without --no-store-vectors."""
        return self.store is not None

    def lookup(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict]:
        """{id: {"file", "row"[, "path"]}}: where each id present came from."""
        return self.metadata.lookup(ids)

    def vectors(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [n], vectors float32 [n, dim]): the stored vector of each id (zeros where
        the id is not in the index). Needs an index built with its vectors stored."""
        if self.store is None:
            raise ValueError(f"{self.directory} was built without its vectors (--no-store-vectors)")
        ranks = self.metadata.ranks(ids)
        found = ranks >= 0
        vectors = np.zeros((len(ranks), self.dim), np.float32)
        if found.any():
            vectors[found] = self.store.get(self.metadata.positions(ranks[found]))
        return found, vectors


@contextlib.contextmanager
def _quiet_stdout():
    """File descriptor 1 sent to /dev/null (FAISS's C++ printf), then restored."""
    sys.stdout.flush()
    with _STDOUT_LOCK, open(os.devnull, "w") as null:
        saved = os.dup(1)
        try:
            os.dup2(null.fileno(), 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


_STDOUT_LOCK = threading.Lock()


def _selector_parameters(removed: np.ndarray, params: dict[str, int]):
    """FAISS SearchParameters that skip the removed ids, carrying the search parameters too
    (SearchParameters given to a search replace the index's own settings)."""
    import faiss

    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(removed))
    if "efSearch" in params and "nprobe" not in params:
        search = faiss.SearchParametersHNSW(sel=selector, efSearch=params["efSearch"])
    else:
        search = faiss.SearchParametersIVF(sel=selector, nprobe=params.get("nprobe", 1))
        if "quantizer_efSearch" in params:
            search.quantizer_params = faiss.SearchParametersHNSW(efSearch=params["quantizer_efSearch"])
    search.keep_alive = selector  # SWIG does not keep the selector alive for us
    return search


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the finished index in `directory` (jobs/build_index.py's output)."""
    manifest = BuildDir(directory).manifest()
    if manifest is None:
        raise FileNotFoundError(f"{directory} holds no finished index (no manifest.json); build it with "
                                f"jobs/build_index.py")
    return manifest


def open_index(directory: str | os.PathLike, shards: Sequence[int] | None = None) -> IndexSearcher:
    """The finished index in `directory`, memory-mapped: all its shards, or those numbered in `shards`."""
    return IndexSearcher(directory, read_manifest(directory), shards)
