"""Approximate inner-product search with FAISS, its parameters chosen by corpus size.

Measured on this project's 2-core CPU with 512-d normalised features (see
benchmarks/knn.py): HNSW builds without training and is the most accurate, but
its build time grows fastest (26 s for 200k rows); an IVF index with 4-bit PQ
fast-scan codes and an exact re-ranking step ("IVF{n},PQ{m}x4fs,RFlat") builds
5x faster and searches >30x faster than exact at recall@10 ~0.99. So: HNSW for
small corpora, IVF-PQ-fast-scan + refine for large ones. No Ray here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

HNSW_MAX_ROWS = 50_000  # auto: HNSW below this many corpus rows, IVF from here on
MIN_TRAIN_PER_LIST = 39  # FAISS's k-means warns with fewer training points per centroid
TRAIN_PER_LIST = 64  # training rows per IVF list: enough for k-means, keeps training to seconds
KINDS = ("auto", "flat", "hnsw", "ivf")


@dataclass(frozen=True)
class FaissSpec:
    """How to build and search one FAISS index."""

    factory: str  # faiss.index_factory description, inner-product metric
    nprobe: int = 0  # IVF lists visited per query (0: not an IVF index)
    ef_search: int = 0  # HNSW candidate-list size (0: not HNSW)
    k_factor: int = 0  # refine: k * k_factor candidates are re-scored exactly (0: no refine step)
    train_rows: int = 0  # corpus rows sampled to train the index (0: needs no training)

    def describe(self) -> str:
        params = [f"{name}={value}" for name, value in
                  (("nprobe", self.nprobe), ("efSearch", self.ef_search), ("k_factor", self.k_factor)) if value]
        return self.factory + (f" ({', '.join(params)})" if params else "")


def choose_index(num_rows: int, dim: int, k: int = 10, kind: str = "auto", nprobe: int = 0,
                 ef_search: int = 0) -> FaissSpec:
    """The index for a corpus of `num_rows` x `dim`. `kind` is auto|flat|hnsw|ivf or
    any faiss index_factory string; nprobe / ef_search override the chosen values."""
    if num_rows <= 0:
        raise ValueError("cannot build a FAISS index over an empty corpus")
    if kind == "auto":
        kind = "hnsw" if num_rows < HNSW_MAX_ROWS else "ivf"
    if kind == "flat":
        return FaissSpec("Flat")
    if kind == "hnsw":
        return FaissSpec("HNSW32,Flat", ef_search=ef_search or max(64, 4 * k))
    if kind == "ivf":
        return _ivf_spec(num_rows, dim, k, nprobe)
    if kind in KINDS or not kind:
        raise ValueError(f"unknown FAISS index kind {kind!r}")
    # A user-given factory string: train on a sample sized as for our own IVF indexes.
    nlist = re.search(r"IVF(\d+)", kind)
    train_rows = min(num_rows, TRAIN_PER_LIST * max(int(nlist.group(1)) if nlist else 0, 256))
    return FaissSpec(kind, nprobe=nprobe or (16 if "IVF" in kind else 0),
                     ef_search=ef_search or (max(64, 4 * k) if "HNSW" in kind else 0),
                     k_factor=8 if "RFlat" in kind or "Refine" in kind else 0, train_rows=train_rows)


def _ivf_spec(num_rows: int, dim: int, k: int, nprobe: int) -> FaissSpec:
    # ~sqrt(N) lists (a power of two), but never fewer training points per list than k-means needs.
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_rows))))
    while nlist > 1 and num_rows < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    train_rows = min(num_rows, TRAIN_PER_LIST * max(nlist, 256))
    # 4-bit PQ codes over 4 dimensions each, re-ranked exactly: 16x smaller codes to scan.
    # Its 16-centroid sub-quantizers need a few hundred training rows.
    codes = f"PQ{dim // 4}x4fs,RFlat" if dim % 4 == 0 and num_rows >= 1024 else "Flat"
    nprobe = nprobe or min(nlist, max(32, nlist // 16))
    return FaissSpec(f"IVF{nlist},{codes}", nprobe=nprobe, k_factor=8 if "RFlat" in codes else 0,
                     train_rows=train_rows)


def build_index(spec: FaissSpec, vectors: np.ndarray, seed: int = 0, num_threads: int = 0):
    """A trained, filled FAISS index over `vectors` (positions are the labels)."""
    import faiss

    if num_threads:
        faiss.omp_set_num_threads(num_threads)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build {spec.factory!r}: {str(exc).splitlines()[-1]}") from None
    if not index.is_trained:
        rows = np.random.default_rng(seed).choice(len(vectors), min(len(vectors), spec.train_rows or len(vectors)),
                                                  replace=False)
        index.train(vectors[np.sort(rows)])
    index.add(vectors)
    set_search_parameters(index, spec)
    return index


def set_search_parameters(index, spec: FaissSpec) -> None:
    import faiss

    space = faiss.ParameterSpace()
    if spec.nprobe:
        space.set_index_parameter(index, "nprobe", spec.nprobe)
    if spec.ef_search:
        space.set_index_parameter(index, "efSearch", spec.ef_search)
    if spec.k_factor:
        refine = faiss.downcast_index(index)
        if hasattr(refine, "k_factor"):
            refine.k_factor = spec.k_factor


def search_index(index, queries: np.ndarray, corpus_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) [B, k] sorted by (score desc, id asc); a slot FAISS could not fill
    (fewer than k candidates reached) has id -1 and score -inf, and sorts last."""
    k = min(k, index.ntotal)
    scores, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    missing = positions < 0
    ids = np.where(missing, -1, corpus_ids[np.where(missing, 0, positions)])
    scores = np.where(missing, -np.inf, scores).astype(np.float32)
    # Missing slots last, then the house order; lexsort's last key is the primary one.
    order = np.lexsort((ids, -scores, missing), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
