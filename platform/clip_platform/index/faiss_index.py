"""Which FAISS index to build over a corpus, and searching one: the choice follows the corpus
size, and for a persistent index the memory it may take when served.

Two kinds of build. A persistent index (jobs/build_index.py) is built once and searched for
months from a memory-mapped file: `choose_served_index` follows autofaiss's published rules
(about 4·sqrt(N) lists, the finest codes that fit the memory budget, inverted lists FAISS can
merge onto disk). The temporary index of `jobs/knn.py --index faiss` is built through the same
code (clip_platform.index) and used once, so its build counts as much as its search:
`temporary_factory` picks few lists (assigning every row to its list dominates the build)
and 4-bit PQ fast-scan codes, cheap to encode and to scan, whose candidates the index
re-ranks from its stored vectors. HNSW builds without training and is the most accurate,
but its build grows fastest (26 s for 200k rows on this project's 2 cores): small corpora only.
No Ray here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

HNSW_MAX_ROWS = 50_000  # temporary index, auto: HNSW below this many corpus rows, IVF from here on
MIN_TRAIN_PER_LIST = 39  # FAISS's k-means warns with fewer training points per centroid
TRAIN_PER_LIST = 64  # training rows per IVF list: enough for k-means, keeps training to seconds
IVF_LISTS_DIVISOR = 8  # temporary IVF index: sqrt(N) / this lists (1M rows: 128)
KINDS = ("auto", "flat", "hnsw", "ivf", "fast")  # fast: temporary_factory's, for an index used once


@dataclass(frozen=True)
class FaissSpec:
    """A FAISS index to build: its factory string (inner-product metric) and how many sampled
    corpus rows train it (0: it needs no training). Search parameters are tuned once it is built."""

    factory: str
    train_rows: int = 0


def temporary_factory(num_rows: int, dim: int) -> str:
    """The factory of a temporary index (built, used once, thrown away) over `num_rows` x `dim`."""
    if num_rows < HNSW_MAX_ROWS:
        return "HNSW32,Flat"
    # Few lists, ~sqrt(N)/8 (a power of two), never fewer training points per list than k-means needs.
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_rows) / IVF_LISTS_DIVISOR)))
    while nlist > 1 and num_rows < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    # 4-bit PQ fast-scan codes over 8 dimensions each (4 where the dimension asks).
    group = 8 if dim % 8 == 0 else 4 if dim % 4 == 0 else 0
    return f"IVF{nlist},PQ{dim // group}x4fs" if group else f"IVF{nlist},Flat"


# ---------------------------------------------------------------- served (persistent) indexes

SERVED_FLAT_MAX_ROWS = 10_000  # auto: one list scanned whole (exact) below this many rows
HNSW_QUANTIZER_LISTS = 4096  # from this many lists on, an HNSW graph finds a vector's lists
PQ_TRAIN_ROWS = 256 * MIN_TRAIN_PER_LIST  # 8-bit PQ: 256 centroids per sub-quantizer
TRAIN_BYTES = 512 * 2**20  # default training sample, held by one task: bounds nlist too (39 rows a list)
ID_BYTES = 8  # each vector's int64 id, stored in its inverted list
PQ_BYTES = (256, 192, 128, 96, 64, 48, 32, 24, 16)  # PQ code sizes tried, finest first; below 16
# bytes recall falls apart, so a corpus that does not fit even then is split into index shards


def choose_served_index(num_rows: int, dim: int, max_memory: int, kind: str = "auto",
                        num_shards: int = 0, train_bytes: int = TRAIN_BYTES) -> tuple[FaissSpec, int]:
    """(index, number of index shards) for a persistent index over `num_rows` x `dim` that may
    take `max_memory` bytes when served. `kind` is auto|flat|hnsw|ivf|fast or a faiss factory
    string. "flat" is one inverted list scanned whole: exact, and memory-mapped like IVF;
    "fast" is `temporary_factory`'s choice, for an index built to be used once.
    Shards: `num_shards`, or (0) as many as it takes for each to fit `max_memory`. The training
    sample may take `train_bytes`, which caps the lists at train_bytes / (39 x 4 x dim)."""
    if num_rows <= 0:
        raise ValueError("cannot build an index over an empty corpus")
    max_train = max(1, min(num_rows, train_bytes // (4 * dim)))
    if kind == "fast":
        kind = temporary_factory(num_rows, dim)
    if kind == "auto":
        fits_flat = num_rows * (4 * dim + ID_BYTES) <= max_memory
        kind = "flat" if num_rows < SERVED_FLAT_MAX_ROWS and fits_flat else "ivf"
    if kind == "flat":
        spec = FaissSpec("IVF1,Flat", train_rows=min(num_rows, 256))
    elif kind == "hnsw":
        spec = FaissSpec("IDMap2,HNSW32,Flat")
    elif kind == "ivf":
        spec = _served_ivf_spec(num_rows, dim, max_memory, max_train)
    elif kind in KINDS or not kind:
        raise ValueError(f"unknown FAISS index kind {kind!r}")
    else:
        # Ids live in the index: IVF lists keep them, anything else needs FAISS's id map.
        factory = kind if "IVF" in kind or kind.startswith("IDMap") else f"IDMap2,{kind}"
        nlist = re.search(r"IVF(\d+)", kind)
        spec = FaissSpec(factory, train_rows=min(max_train, TRAIN_PER_LIST * max(int(nlist.group(1)) if nlist
                                                                                 else 0, 256)))
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
    return FaissSpec(f"{quantizer},{code}", train_rows=train_rows)


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


def search_index(index, queries: np.ndarray, corpus_ids: np.ndarray | None, k: int,
                 params=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) [B, k] sorted by (score desc, id asc); a slot FAISS could not fill
    (fewer than k candidates reached) has id -1 and score -inf, and sorts last. FAISS's
    labels are positions in `corpus_ids`, or (None) the ids themselves. `params`: FAISS
    SearchParameters for this search (an id selector, nprobe)."""
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, positions = index.search(queries, k) if params is None else index.search(queries, k, params=params)
    missing = positions < 0
    labels = positions if corpus_ids is None else corpus_ids[np.where(missing, 0, positions)]
    ids = np.where(missing, -1, labels)
    scores = np.where(missing, -np.inf, scores).astype(np.float32)
    # Missing slots last, then the house order; lexsort's last key is the primary one.
    order = np.lexsort((ids, -scores, missing), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
