"""Tuning an index's search parameter on held-out corpus vectors: the smallest nprobe
(IVF) or efSearch (HNSW) whose recall@k against exact search reaches the target with 95%
confidence (the lower bound mean - 1.645 standard errors over the tuning queries: a setting
that reaches the target only on average misses it on half of the query sets). Recall grows
with either knob, so the value is found by doubling, then bisecting. No Ray here."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MAX_EF_SEARCH = 4096
MIN_QUANTIZER_EF = 64  # an HNSW coarse quantizer must find at least nprobe lists, with room to spare
RERANK = 8  # PQ codes: candidates re-scored per result, to begin with
MAX_RERANK = 64
PLATEAU = 0.005  # recall gained by doubling the knob below which re-ranking is raised instead


CONFIDENCE_Z = 1.645  # one-sided 95%


@dataclass
class Tuned:
    params: dict[str, int]
    recall: float  # mean over the tuning queries
    lower_bound: float = 0.0  # recall - CONFIDENCE_Z standard errors: what reaches the target
    trials: list[tuple] = field(default_factory=list)  # (value[, rerank], recall, lower bound) tried


def recall_bounds(per_query: np.ndarray) -> tuple[float, float]:
    """(mean, one-sided 95% lower bound) of per-query recalls."""
    mean = float(np.mean(per_query))
    error = float(np.std(per_query, ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return mean, mean - CONFIDENCE_Z * error


def search_parameters(factory: str, value: int, rerank: int = 0) -> dict[str, int]:
    """The search parameters for one setting of the tuned knob of `factory`, with `rerank`
    candidates per result re-scored against the stored vectors (0: none)."""
    params: dict[str, int] = {}
    if "IVF" in factory:
        params["nprobe"] = value
        if re.search(r"IVF\d+_HNSW", factory):
            params["quantizer_efSearch"] = max(MIN_QUANTIZER_EF, 2 * value)
    elif "HNSW" in factory:
        params["efSearch"] = value
    return {**params, "rerank": rerank} if rerank else params


def rerank_factor(factory: str, vectors_stored: bool) -> int:
    """Candidates per result to re-score: PQ codes rank coarsely (an 8-bit PQ of 32 bytes for
    512 dimensions confuses close neighbours), so their k x RERANK best are re-scored from the
    stored vectors; flat and scalar codes rank finely enough without."""
    return RERANK if vectors_stored and re.search(r"PQ\d", factory) else 0


def tune(factory: str, recall_of: Callable[[dict[str, int]], tuple[float, float]], target: float, k: int,
         rerank: int = 0) -> Tuned:
    """The cheapest setting of `factory`'s knob whose recall_of(params) (mean, lower bound)
    has its lower bound >= target, or the most accurate one tried when none reaches it (logged).
    With re-ranking, a recall that stops growing with the knob is the codes' limit: the
    candidates re-scored are doubled (up to MAX_RERANK), and the knob is then bisected there."""
    nlist = re.search(r"IVF(\d+)", factory)
    low, high = (1, int(nlist.group(1))) if nlist else (max(16, k), MAX_EF_SEARCH) if "HNSW" in factory else (0, 0)
    tuned = Tuned({}, 0.0)
    means: dict[tuple[int, int], float] = {}

    def measure(value: int) -> float:
        """The lower bound of the recall at `value` (and the current rerank); the mean is kept."""
        params = search_parameters(factory, value, rerank)
        mean, bound = recall_of(params)
        means[value, rerank] = mean
        tuned.trials.append((value, round(mean, 5), round(bound, 5)) if not rerank
                            else (value, rerank, round(mean, 5), round(bound, 5)))
        log.info("%s %s: recall@%d %.4f (95%% lower bound %.4f)", factory, params or "as built", k, mean, bound)
        return bound

    if not high:  # nothing to tune (a flat scan, a factory without a knob)
        while (recall := measure(0)) < target and 0 < rerank < MAX_RERANK:
            rerank *= 2
        return Tuned(search_parameters(factory, 0, rerank), means[0, rerank], recall, tuned.trials)
    failed, value, previous = low - 1, low, -1.0
    while (recall := measure(value)) < target:
        if rerank and rerank < MAX_RERANK and (value == high or recall - previous < PLATEAU):
            rerank, previous = rerank * 2, -1.0  # the codes' limit: re-score more candidates, same knob
            continue
        if value == high:
            break
        failed, value, previous = value, min(high, 2 * value), recall
    if recall < target:
        log.warning("recall@%d %.4f at the largest setting (%s): the target %.2f is out of reach of %s", k,
                    means[value, rerank], search_parameters(factory, value, rerank), target, factory)
        return Tuned(search_parameters(factory, value, rerank), means[value, rerank], recall, tuned.trials)
    best = (value, recall)
    while best[0] - failed > 1:  # the smallest passing value lies in (failed, best]
        middle = (failed + best[0]) // 2
        recall = measure(middle)
        if recall >= target:
            best = (middle, recall)
        else:
            failed = middle
    return Tuned(search_parameters(factory, best[0], rerank), means[best[0], rerank], best[1], tuned.trials)
