"""Approximate inner-product search with FAISS, its parameters chosen by corpus size.

A batch job builds its index once and uses it once, so the build counts as much as
the search. Measured on this project's 2-core CPU (benchmarks/knn.py: 10k queries
over 1M clustered 512-d features): "IVF128,PQ64x4fs" (few lists, as assigning every
row to a list dominates the build; 4-bit PQ fast-scan codes, cheap to encode and to
scan), trained on 16k sampled rows, 16 lists visited, with its 160 best candidates
re-scored exactly against the corpus arrays in place, builds in 5.4 s and searches in
1.7 s at recall@10 0.978: 47x exact search alone, 11.4x counting the build (with 256
lists and 32 visited: recall 0.989 at 9.6-9.9x, short of the 10x target). FAISS's own
re-ranking (RFlat) copies the corpus, and faulting in a fresh 2 GB copy took
longer (~6 s) than the rest of the build. HNSW builds without training and is the
most accurate, but its build grows fastest (26 s for 200k rows): small corpora only.
No Ray here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HNSW_MAX_ROWS = 50_000  # auto: HNSW below this many corpus rows, IVF from here on
MIN_TRAIN_PER_LIST = 39  # FAISS's k-means warns with fewer training points per centroid
TRAIN_PER_LIST = 64  # training rows per IVF list: enough for k-means, keeps training to seconds
IVF_LISTS_DIVISOR = 8  # IVF lists: sqrt(N) / this (1M rows: 128 lists)
RERANK_FACTOR = 16  # IVF-PQ: k * RERANK_FACTOR candidates re-scored exactly
KINDS = ("auto", "flat", "hnsw", "ivf")


@dataclass(frozen=True)
class FaissSpec:
    """How to build and search one FAISS index."""

    factory: str  # faiss.index_factory description, inner-product metric
    nprobe: int = 0  # IVF lists visited per query (0: not an IVF index)
    ef_search: int = 0  # HNSW candidate-list size (0: not HNSW)
    k_factor: int = 0  # FAISS refine (RFlat): k * k_factor candidates re-scored from its own copy (0: none)
    rerank: int = 0  # k * rerank candidates re-scored exactly against the corpus vectors themselves (0: none)
    train_rows: int = 0  # corpus rows sampled to train the index (0: needs no training)

    def describe(self) -> str:
        params = [f"{name}={value}" for name, value in
                  (("nprobe", self.nprobe), ("efSearch", self.ef_search), ("k_factor", self.k_factor),
                   ("rerank", self.rerank)) if value]
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
    # A batch job builds its index once, and the build is dominated by assigning every
    # corpus row to its list (N x nlist dot products): so few lists, ~sqrt(N)/8 (a power
    # of two), and never fewer training points per list than k-means needs.
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_rows) / IVF_LISTS_DIVISOR)))
    while nlist > 1 and num_rows < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    train_rows = min(num_rows, TRAIN_PER_LIST * max(nlist, 256))
    nprobe = nprobe or min(nlist, max(16, nlist // 8))
    # 4-bit PQ fast-scan codes over 8 dimensions each (4 where the dimension asks): cheap
    # to encode and to scan; their 16-centroid sub-quantizers need a few hundred training
    # rows. The candidates are then re-scored exactly against the corpus vectors in
    # place, not against a copy (FAISS's RFlat): a fresh multi-GB copy is slow to fault in.
    group = 8 if dim % 8 == 0 else 4 if dim % 4 == 0 else 0
    if not group or num_rows < 1024:
        return FaissSpec(f"IVF{nlist},Flat", nprobe=nprobe, train_rows=train_rows)
    return FaissSpec(f"IVF{nlist},PQ{dim // group}x4fs", nprobe=nprobe, rerank=RERANK_FACTOR, train_rows=train_rows)


# ---------------------------------------------------------------- served (persistent) indexes
#
# A served index is built once and searched for months from a memory-mapped file, so the
# choice follows autofaiss's published rules rather than the batch job's build-time ones:
# about 4·sqrt(N) lists, the finest codes that fit the memory budget, and inverted lists
# that FAISS can merge onto disk (no fast-scan blocks, no in-memory refine copy).

SERVED_FLAT_MAX_ROWS = 10_000  # auto: one list scanned whole (exact) below this many rows
HNSW_QUANTIZER_LISTS = 4096  # from this many lists on, an HNSW graph finds a vector's lists
PQ_TRAIN_ROWS = 256 * MIN_TRAIN_PER_LIST  # 8-bit PQ: 256 centroids per sub-quantizer
MAX_TRAIN_BYTES = 512 * 2**20  # the training sample, held by one task: bounds nlist too
ID_BYTES = 8  # each vector's int64 id, stored in its inverted list
PQ_BYTES = (256, 192, 128, 96, 64, 48, 32, 24, 16)  # PQ code sizes tried, finest first; below 16
# bytes recall falls apart, so a corpus that does not fit even then is split into index shards


def choose_served_index(num_rows: int, dim: int, max_memory: int, kind: str = "auto",
                        num_shards: int = 0) -> tuple[FaissSpec, int]:
    """(index, number of index shards) for a persistent index over `num_rows` x `dim` that may
    take `max_memory` bytes when served. `kind` is auto|flat|hnsw|ivf or a faiss factory
    string. "flat" is one inverted list scanned whole: exact, and memory-mapped like IVF.
    Shards: `num_shards`, or (0) as many as it takes for each to fit `max_memory`."""
    if num_rows <= 0:
        raise ValueError("cannot build an index over an empty corpus")
    max_train = max(1, min(num_rows, MAX_TRAIN_BYTES // (4 * dim)))
    if kind == "auto":
        fits_flat = num_rows * (4 * dim + ID_BYTES) <= max_memory
        kind = "flat" if num_rows < SERVED_FLAT_MAX_ROWS and fits_flat else "ivf"
    if kind == "flat":
        spec = FaissSpec("IVF1,Flat", nprobe=1, train_rows=min(num_rows, 256))
    elif kind == "hnsw":
        spec = FaissSpec("IDMap2,HNSW32,Flat", ef_search=64)
    elif kind == "ivf":
        spec = _served_ivf_spec(num_rows, dim, max_memory, max_train)
    elif kind in KINDS or not kind:
        raise ValueError(f"unknown FAISS index kind {kind!r}")
    else:
        spec = choose_index(num_rows, dim, kind=kind)
        # Ids live in the index: IVF lists keep them, anything else needs FAISS's id map.
        factory = spec.factory if "IVF" in spec.factory or spec.factory.startswith("IDMap") \
            else f"IDMap2,{spec.factory}"
        spec = dataclasses.replace(spec, factory=factory, train_rows=min(spec.train_rows, max_train))
    size = served_bytes(spec.factory, num_rows, dim)
    return spec, num_shards or max(1, math.ceil(size / max_memory))


def _served_ivf_spec(num_rows: int, dim: int, max_memory: int, max_train: int) -> FaissSpec:
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_rows))))
    while nlist > 1 and min(num_rows, max_train) < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"
    codes = ["Flat", "SQ8"] + [f"PQ{m}x8" for m in PQ_BYTES if m < dim and dim % m == 0]
    if num_rows < PQ_TRAIN_ROWS:  # too few rows to train 8-bit PQ: scalar codes only
        codes = codes[:2]
    fitting = [c for c in codes if served_bytes(f"{quantizer},{c}", num_rows, dim) <= max_memory]
    code = fitting[0] if fitting else codes[-1]  # nothing fits: the smallest, split into shards
    train_rows = min(max_train, max(TRAIN_PER_LIST * nlist, PQ_TRAIN_ROWS if code.startswith("PQ") else 0))
    return FaissSpec(f"{quantizer},{code}", nprobe=min(nlist, 16), train_rows=train_rows)


def served_bytes(factory: str, num_rows: int, dim: int) -> int:
    """Bytes an index of `factory` takes over `num_rows` x `dim`: codes and ids, plus the
    coarse centroids (HNSW graphs and other small overheads left out)."""
    per_vector = 4 * dim
    if match := re.search(r"PQ(\d+)(?:x(\d+))?", factory):
        per_vector = math.ceil(int(match.group(1)) * int(match.group(2) or 8) / 8)
    elif "SQ8" in factory:
        per_vector = dim
    elif "SQ4" in factory:
        per_vector = math.ceil(dim / 2)
    if (graph := re.search(r"HNSW(\d+)", factory)) and "IVF" not in factory:
        per_vector += 2 * int(graph.group(1)) * 4  # the bottom layer's int32 links
    nlist = re.search(r"IVF(\d+)", factory)
    return num_rows * (per_vector + ID_BYTES) + (int(nlist.group(1)) if nlist else 0) * dim * 4


def mergeable_on_disk(factory: str) -> bool:
    """Whether FAISS can merge partial indexes of `factory` into on-disk inverted lists:
    IVF with plain codes (fast-scan codes are packed in blocks; refine keeps a copy in memory)."""
    return "IVF" in factory and not re.search(r"fs\b|fsr\b|PQR|RFlat|Refine", factory)


def build_index(spec: FaissSpec, vectors: np.ndarray | Sequence[np.ndarray], seed: int = 0, num_threads: int = 0):
    """A trained, filled index over `vectors`, one array or several (corpus shards, added
    in turn rather than copied into one); positions in that order are the labels. With
    `spec.rerank`, a `ReRanked` index that keeps (does not copy) the arrays."""
    import faiss

    if num_threads:
        faiss.omp_set_num_threads(num_threads)
    parts = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
    parts = [np.ascontiguousarray(p, dtype=np.float32) for p in parts if len(p)]
    if not parts:
        raise ValueError("cannot build a FAISS index over an empty corpus")
    num_rows, dim = sum(len(p) for p in parts), parts[0].shape[1]
    try:
        index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build {spec.factory!r}: {str(exc).splitlines()[-1]}") from None
    if not index.is_trained:
        index.train(_sample_rows(parts, spec.train_rows or num_rows, seed))
    for part in parts:
        index.add(part)
    set_search_parameters(index, spec)
    return ReRanked(index, parts, spec.rerank) if spec.rerank else index


def _sample_rows(parts: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """`size` rows drawn uniformly without replacement from the concatenation of `parts`."""
    num_rows = sum(len(p) for p in parts)
    rows = np.sort(np.random.default_rng(seed).choice(num_rows, min(num_rows, size), replace=False))
    starts = np.cumsum([0] + [len(p) for p in parts])
    which = np.searchsorted(starts, rows, side="right") - 1
    return np.concatenate([parts[i][rows[which == i] - starts[i]] for i in range(len(parts))])


class ReRanked:
    """A FAISS index whose k * factor best candidates are re-scored exactly against the
    corpus arrays it was built from (each shard scored in place by FAISS's
    fvec_inner_products_by_idx), then cut to k. Searches like a FAISS index."""

    def __init__(self, index, parts: list[np.ndarray], factor: int):
        self.index, self.parts, self.factor = index, parts, factor
        self.starts = np.cumsum([0] + [len(p) for p in parts])[:-1]
        self.ntotal = index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, candidates = self.index.search(queries, min(self.ntotal, k * self.factor))
        scores = np.full(candidates.shape, -np.inf, np.float32)
        part_scores = np.empty_like(scores)
        for part, start in zip(self.parts, self.starts):
            local = candidates - start
            local[(candidates < 0) | (local >= len(part))] = -1  # not in this part: scored -inf
            if (local >= 0).any():
                faiss.fvec_inner_products_by_idx(faiss.swig_ptr(part_scores), faiss.swig_ptr(queries),
                                                 faiss.swig_ptr(part), faiss.swig_ptr(local), part.shape[1],
                                                 len(queries), candidates.shape[1])
                np.maximum(scores, part_scores, out=scores)
        order = np.lexsort((candidates, -scores), axis=1)[:, :k]
        scores, positions = np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
        return scores, np.where(np.isfinite(scores), positions, -1)


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


def search_index(index, queries: np.ndarray, corpus_ids: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) [B, k] sorted by (score desc, id asc); a slot FAISS could not fill
    (fewer than k candidates reached) has id -1 and score -inf, and sorts last. FAISS's
    labels are positions in `corpus_ids`, or (None) the ids themselves."""
    k = min(k, index.ntotal)
    scores, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    missing = positions < 0
    labels = positions if corpus_ids is None else corpus_ids[np.where(missing, 0, positions)]
    ids = np.where(missing, -1, labels)
    scores = np.where(missing, -np.inf, scores).astype(np.float32)
    # Missing slots last, then the house order; lexsort's last key is the primary one.
    order = np.lexsort((ids, -scores, missing), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
