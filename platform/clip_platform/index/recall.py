"""Recall, the one hit rule: cn_clip's R@1/5/10 of ranked predictions against ground truth
(jobs/evaluate.py, training's validation), and recall@k of approximate top-k against exact
top-k (knn --index faiss, an index build's tuning). No Ray."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Recall:
    """Hit counts at 1/5/10 over `num_queries` queries."""

    hits1: int
    hits5: int
    hits10: int
    num_queries: int

    # The arithmetic below is cn_clip's, operation for operation, so the floats are bit-identical.
    @property
    def r1(self) -> float:
        return self.hits1 * 1.0 / self.num_queries

    @property
    def r5(self) -> float:
        return self.hits5 * 1.0 / self.num_queries

    @property
    def r10(self) -> float:
        return self.hits10 * 1.0 / self.num_queries

    @property
    def mean_recall(self) -> float:
        return (self.r1 + self.r5 + self.r10) / 3.0

    def to_json(self) -> dict:
        """cn_clip's report_score dict."""
        mean = self.mean_recall
        return {"success": True, "score": mean * 100,
                "scoreJson": {"score": mean * 100, "mean_recall": mean * 100, "r1": self.r1 * 100,
                              "r5": self.r5 * 100, "r10": self.r10 * 100}}


def compute_recall(reference: dict[int, list[int]], predictions: dict[int, list[int]]) -> Recall:
    if not reference:
        raise ValueError("the ground truth holds no queries")
    hits = [0, 0, 0]
    for query_id, relevant in reference.items():
        ranked = predictions[query_id]
        for slot, k in enumerate((1, 5, 10)):
            top = ranked[:k]
            hits[slot] += any(i in top for i in set(relevant))
    return Recall(*hits, num_queries=len(reference))


def per_query_recall(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|approx top-k ∩ exact top-k| / |exact top-k| of each query (-1 ids in approx: no hit)."""
    return np.asarray([len(set(a[a >= 0].tolist()) & set(e.tolist())) / max(1, len(e))
                       for a, e in zip(approx, exact)], np.float64)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|."""
    hits = per_query_recall(approx, exact)
    return float(np.mean(hits)) if len(hits) else float("nan")
