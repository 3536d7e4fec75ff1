"""Exact top-k by inner product, ties broken by the smaller id.

The order is total -- score descending, then id ascending -- so the top-k of a
union is the top-k of the union of each part's top-k: corpus shards are searched
independently and their partial results merged, with ids identical to one brute
force pass over the whole corpus. Plain torch/numpy, no Ray.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

MAX_SCORE_BYTES = 64 * 2**20  # one query-block x corpus-chunk score matrix; bounds a task's memory


def sort_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of each row in (score descending, id ascending) order."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial top-k results (scores [B, k_i], ids [B, k_i]) of disjoint corpus parts."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    return sort_rows(scores, ids, k)


def chunk_topk(scores: torch.Tensor, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a score matrix [B, C] whose columns have ids [C]; exact under ties.

    torch.topk picks arbitrarily among equal scores, so it is asked for k + 1: a
    row whose k-th and (k+1)-th scores differ has an unambiguous top-k set; the
    rare rows where they are equal are redone exactly over every tied column."""
    num_rows, num_cols = scores.shape
    k = min(k, num_cols)
    if k == 0:
        return np.zeros((num_rows, 0), np.float32), np.zeros((num_rows, 0), np.int64)
    if k == num_cols:
        return sort_rows(scores.numpy(), np.broadcast_to(ids, (num_rows, num_cols)), k)
    values, positions = scores.topk(k + 1, dim=1)
    values, positions = values.numpy(), positions.numpy()
    top_scores, top_ids = values[:, :k].copy(), ids[positions[:, :k]]
    for row in np.flatnonzero(values[:, k] == values[:, k - 1]):
        top_scores[row], top_ids[row] = _row_topk_with_ties(scores[row].numpy(), ids, values[row, k - 1], k)
    return sort_rows(top_scores, top_ids, k)


def _row_topk_with_ties(row: np.ndarray, ids: np.ndarray, kth: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    candidates = np.flatnonzero(row >= kth)  # everything above the k-th score, and every tie with it
    order = np.lexsort((ids[candidates], -row[candidates]))[:k]
    return row[candidates][order], ids[candidates][order]


def exact_topk(queries: np.ndarray, corpus: np.ndarray, corpus_ids: np.ndarray, k: int,
               chunk_rows: int = 32768, max_score_bytes: int = MAX_SCORE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k corpus ids (and scores) for every query: [B, min(k, N)] each.

    The corpus is scored in chunks of `chunk_rows` and queries in sub-blocks, so
    the score matrix never exceeds `max_score_bytes`; a running top-k is merged
    after each chunk."""
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"query features have {queries.shape[1]} dimensions, corpus features {corpus.shape[1]}")
    num_queries, k = len(queries), min(k, len(corpus))
    chunk_rows = max(1, min(chunk_rows, len(corpus)))
    query_rows = max(1, min(num_queries, max_score_bytes // (4 * chunk_rows)))
    best_scores = np.full((num_queries, 0), -np.inf, np.float32)
    best_ids = np.zeros((num_queries, 0), np.int64)
    buffer = torch.empty(query_rows * chunk_rows)  # reused: fresh large allocations cost page faults
    q_all, c_all = _as_tensor(queries), _as_tensor(corpus)
    for start in range(0, len(corpus), chunk_rows):
        chunk, chunk_ids = c_all[start:start + chunk_rows], corpus_ids[start:start + chunk_rows]
        parts = []
        for q in range(0, num_queries, query_rows):
            block = q_all[q:q + query_rows]
            scores = torch.mm(block, chunk.T, out=buffer[:len(block) * len(chunk)].view(len(block), len(chunk)))
            parts.append(chunk_topk(scores, chunk_ids, k))
        chunk_scores = np.concatenate([s for s, _ in parts]) if parts else best_scores
        chunk_best = np.concatenate([i for _, i in parts]) if parts else best_ids
        best_scores, best_ids = merge_topk([(best_scores, best_ids), (chunk_scores, chunk_best)], k)
    return best_scores, best_ids


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays from Ray's object store are read-only; they are only ever read here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
