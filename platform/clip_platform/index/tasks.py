"""The Ray tasks of an index build. Each holds one feature shard (or the training sample,
or one index shard's mapped partials) and writes its result to the build folder itself,
atomically, so a retried task (its node was lost) or a resumed build redoes only what is
missing. What they return is small: counts, and the node that did the work."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from ..data.features import FeatureShard, check_unique_ids
from ..ray_context import node_id
from .topk import exact_topk
from ..io import atomic_path
from .metadata import merge_id_runs, write_id_run
from .recall import per_query_recall
from .search import IndexSearcher
from .tune import recall_bounds, rerank_factor, tune
from .vectors import write_rows

RETRIES = 3  # system failures (a node or worker lost); user errors are never retried


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.savez(out, **arrays)


def _write_index(index, path: Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)


def new_index(factory: str, dim: int):
    """An empty FAISS index of `factory` over inner products; a bad factory string is the user's error."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build {factory!r}: {str(exc).strip().splitlines()[-1]}") from None


def sample_rows(dim: int, train_bytes: int, extra: int) -> int:
    """Rows of the training pool: the training sample's byte budget, plus the tuning queries."""
    return train_bytes // (4 * dim) + extra


@ray.remote(num_cpus=1, max_retries=RETRIES)
def scan_shard(shard: FeatureShard, source: int, run_path: Path, sample_path: Path | None, known_rows: int | None,
               train_bytes: int, extra_rows: int, seed: int, number: int) -> dict:
    """Check one shard, write its sorted id run, and keep its rows of smallest random key:
    across all shards, the pool's smallest keys are a uniform sample of the corpus (no
    sample_path: no sample, as for features added to a trained index)."""
    features = shard.read()
    check_unique_ids(features.ids, shard.path)  # row-group shards are read unchecked
    write_id_run(run_path, features.ids, source, shard.first_row, shard.read_paths())
    if sample_path is None:
        return {"rows": len(features), "dim": features.dim, "node": node_id()}
    keys = np.random.default_rng([seed, number]).random(len(features))
    cap = sample_rows(max(1, features.dim), train_bytes, extra_rows)
    # With the corpus size known, a row can only be among the pool's smallest keys with a key under
    # about cap / N: twice that keeps every candidate while shipping ~2x the pool, not every shard's cap.
    pick = np.flatnonzero(keys < (min(1.0, 2 * cap / known_rows) if known_rows else 1.0))
    pick = pick[np.argsort(keys[pick], kind="stable")[:cap]]
    _save_arrays(sample_path, keys=keys[pick], vectors=features.vectors[pick], ids=features.ids[pick])
    return {"rows": len(features), "dim": features.dim, "node": node_id()}


@ray.remote(num_cpus=1, max_retries=RETRIES)
def merge_metadata(runs: Sequence[Path], offsets: Sequence[int | None], sources: Sequence[str], directory: Path,
                   generation: int = 0, drop: np.ndarray | None = None) -> int:
    return merge_id_runs(runs, offsets, sources, directory, generation, drop)


@ray.remote(max_retries=RETRIES)
def train(factory: str, dim: int, samples: Sequence[Path], num_queries: int, train_rows: int, trained_path: Path,
          queries_path: Path, threads: int) -> int:
    """Draw the tuning queries and the training rows from the pooled shard samples (disjoint:
    the queries are held out), train an empty index and write it; returns the rows trained on."""
    import faiss

    want = num_queries + train_rows
    # The pool's smallest keys, found from the keys alone; then only those rows are loaded, into
    # one array: the task holds the pool once (not a growing pool and its copies).
    keys = []
    for path in samples:
        with np.load(path) as part:
            keys.append(part["keys"])
    everything = np.concatenate(keys)
    cut = np.partition(everything, want - 1)[want - 1] if len(everything) > want else np.inf
    taken = sum(int((k <= cut).sum()) for k in keys)
    pool_keys, vectors = np.empty(taken), np.empty((taken, dim), np.float32)
    ids, filled = np.empty(taken, np.int64), 0
    for path, part_keys in zip(samples, keys):
        rows = np.flatnonzero(part_keys <= cut)
        if len(rows):
            with np.load(path) as part:
                end = filled + len(rows)
                pool_keys[filled:end], vectors[filled:end], ids[filled:end] = \
                    part_keys[rows], part["vectors"][rows], part["ids"][rows]
                filled = end
    order = np.argsort(pool_keys, kind="stable")[:want]  # ties at the cut: the first `want` by key
    queries = order[:num_queries]
    _save_arrays(queries_path, vectors=vectors[queries], ids=ids[queries])
    vectors = vectors[order[num_queries:]]
    index = new_index(factory, dim)
    if not index.is_trained:
        faiss.omp_set_num_threads(threads)
        index.train(vectors)
    _write_index(index, trained_path)
    return len(vectors)


@ray.remote(num_cpus=1, max_retries=RETRIES)
def encode_shard(shard: FeatureShard, queries_path: Path | None, exact_path: Path | None, k: int,
                 trained_path: Path | None, part_path: Path | None, vectors_path: Path | None,
                 vectors_first: int) -> dict:
    """The exact top-k of the tuning queries over this shard (their ground truth, merged over
    shards by the driver; none for added features), the shard's rows in the vector store
    from row `vectors_first` and, for on-disk indexes, the shard's partial index."""
    import faiss

    features = shard.read()
    if queries_path is not None:
        with np.load(queries_path) as queries:
            scores, ids = exact_topk(queries["vectors"], features.vectors, features.ids, k + 1)  # + the query itself
        _save_arrays(exact_path, scores=scores, ids=ids)
    if vectors_path is not None:
        write_rows(vectors_path, vectors_first, features.vectors)
    if part_path is not None and len(features):
        index = faiss.read_index(str(trained_path))
        index.add_with_ids(features.vectors, features.ids)
        _write_index(index, part_path)
    return {"rows": len(features), "node": node_id()}


@ray.remote(max_retries=RETRIES)
def build_whole(shards: Sequence[FeatureShard], trained_path: Path, index_path: Path, threads: int) -> int:
    """An index FAISS cannot merge on disk (HNSW, fast-scan codes), filled shard by shard in one
    task: it holds the whole index, as served."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(trained_path))
    for shard in shards:
        features = shard.read()
        index.add_with_ids(features.vectors, features.ids)
    _write_index(index, index_path)
    return int(index.ntotal)


@ray.remote(num_cpus=1, max_retries=RETRIES)
def merge_parts(trained_path: Path, parts: Sequence[Path], index_path: Path, ivfdata_path: Path) -> int:
    """One index shard: the partial indexes' inverted lists merged into one on-disk file (read
    memory-mapped, so the task holds no codes), and the index that maps it."""
    from faiss.contrib.ondisk import merge_ondisk
    import faiss

    index = faiss.read_index(str(trained_path))
    ivfdata_path.unlink(missing_ok=True)  # a file left by an interrupted merge
    merge_ondisk(index, [str(p) for p in parts], str(ivfdata_path))
    _write_index(index, index_path)
    return int(index.ntotal)


@ray.remote(num_cpus=1, max_retries=RETRIES)
def tune_index(directory: Path, manifest: dict, queries_path: Path, exact_ids: np.ndarray, target: float,
               k: int) -> dict:
    index = IndexSearcher(directory, manifest)
    with np.load(queries_path) as saved:
        queries, query_ids = saved["vectors"], saved["ids"]

    def recall_of(params: dict[str, int]) -> tuple[float, float]:
        index.set_parameters(params)
        found = others(index.search(queries, k + 1)[1], query_ids, k)
        return recall_bounds(per_query_recall(found, exact_ids))

    tuned = tune(manifest["factory"], recall_of, target, k, rerank_factor(manifest["factory"],
                                                                          manifest["vectors"] is not None))
    return {"params": tuned.params, "recall": tuned.recall, "lower_bound": tuned.lower_bound, "trials": tuned.trials}


def others(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The first k of each row of `found` (ids [n, >k]) other than the row's query itself:
    the tuning queries are corpus vectors, and finding oneself is no measure of an index."""
    self_hit = found == own[:, None]
    self_hit[~self_hit.any(axis=1), -1] = True  # the query not found: drop the last instead
    return found[~self_hit].reshape(len(found), -1)[:, :k]


def file_bytes(paths: Sequence[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
