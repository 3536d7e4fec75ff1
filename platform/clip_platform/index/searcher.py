"""The one search interface: `Searcher.search(queries, k) -> (scores, ids)`, plus `lookup(ids)`
(where each id came from) and `vectors(ids)` (its stored vector).

Results are [n, k] by inner product in the house order (score descending, then id ascending),
a total order, so the top-k of a union is the merged top-k of its parts: `merge` combines the
results of disjoint parts, and `fan_out` searches parts in turn and merges them. That is how an
index searches its shards, how exact search covers feature shards, how the knn job merges its
Ray tasks' results and how Serve's Gateway merges its Search deployments' answers.

Implementations: `ExactSearcher` over feature shards (brute force, exact under ties),
`FaissShard` over one FAISS index, and the built index of search.py (`IndexSearcher`, from
`open_index`). No Ray here: the jobs and Serve wrap these in tasks and deployments.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ..data.features import Features, FeatureShard
from .faiss_index import search_index
from .topk import MAX_SCORE_BYTES, exact_topk, merge_topk


def empty_result(num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((num_queries, 0), -np.inf, np.float32), np.full((num_queries, 0), -1, np.int64)


def merge(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of disjoint parts' results (scores [n, k_i], ids [n, k_i]); at least one part."""
    return parts[0] if len(parts) == 1 and parts[0][0].shape[1] <= k else merge_topk(list(parts), k)


def fan_out(searchers: Sequence[Searcher], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each searcher's top-k, merged: the top-k of their union."""
    parts = [searcher.search(queries, k) for searcher in searchers]
    return merge(parts, k) if parts else empty_result(len(queries))


class Searcher(ABC):
    """Inner-product top-k over a set of vectors with int64 ids."""

    dim: int
    ntotal: int  # vectors searched; -1 where not known before reading (JSONL feature shards)

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, <=k] in (score desc, id asc) order; slots no vector reached have id -1
        and score -inf."""

    def lookup(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict]:
        """{id: metadata} for the ids present."""
        raise NotImplementedError(f"{type(self).__name__} keeps no metadata")

    def vectors(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [n], vectors float32 [n, dim]), zeros where an id is absent."""
        raise NotImplementedError(f"{type(self).__name__} keeps no vectors")

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape}: the searcher holds {self.dim}-dimensional vectors")
        return queries


class FaissShard(Searcher):
    """One FAISS index whose labels are the ids; `params`: FAISS SearchParameters (an id selector
    that skips removed ids, nprobe), or None for the index's own settings."""

    def __init__(self, index, params=None):
        self.index, self.params = index, params
        self.dim, self.ntotal = index.d, int(index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.ntotal:
            return empty_result(len(queries))
        return search_index(self.index, self.check_queries(queries), None, k, self.params)


class ExactSearcher(Searcher):
    """Exact search over feature data: in-memory `Features`, or `FeatureShard`s read one at a
    time when searched (memory: one shard, whatever the corpus). Ids are identical to one brute
    force pass over the union. `chunk_rows`: corpus rows scored per matrix product."""

    def __init__(self, parts: Sequence[Features | FeatureShard], dim: int, chunk_rows: int = 32768,
                 max_score_bytes: int = MAX_SCORE_BYTES):
        self.parts, self.dim, self.chunk_rows, self.max_score_bytes = list(parts), dim, chunk_rows, max_score_bytes
        sizes = [len(p) if isinstance(p, Features) else p.num_rows for p in self.parts]
        self.ntotal = -1 if any(size < 0 for size in sizes) else sum(sizes)

    def _features(self):
        for part in self.parts:
            features = part if isinstance(part, Features) else part.read()
            if len(features):
                if features.dim != self.dim:
                    raise ValueError(f"corpus features of {features.dim} dimensions among {self.dim}-dimensional ones")
                yield features

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = self.check_queries(queries)
        parts = [exact_topk(queries, f.vectors, f.ids, k, self.chunk_rows, self.max_score_bytes)
                 for f in self._features()]
        return merge(parts, k) if parts else empty_result(len(queries))

    def vectors(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.asarray(ids, np.int64)
        found = np.zeros(len(wanted), bool)
        vectors = np.zeros((len(wanted), self.dim), np.float32)
        for features in self._features():
            order = np.argsort(features.ids, kind="stable")
            at = np.clip(np.searchsorted(features.ids, wanted, sorter=order), 0, len(order) - 1)
            hit = features.ids[order[at]] == wanted
            vectors[hit] = features.vectors[order[at[hit]]]
            found |= hit
        return found, vectors
