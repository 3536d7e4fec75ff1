"""Tuning an index's search parameter on held-out corpus vectors: the smallest nprobe
(IVF) or efSearch (HNSW) whose recall@k against exact search reaches the target. Recall
grows with either, so the value is found by doubling, then bisecting. No Ray here."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_EF_SEARCH = 4096
MIN_QUANTIZER_EF = 64  # an HNSW coarse quantizer must find at least nprobe lists, with room to spare


@dataclass
class Tuned:
    params: dict[str, int]
    recall: float
    trials: list[tuple[int, float]] = field(default_factory=list)  # (value, recall) tried, for the manifest


def search_parameters(factory: str, value: int) -> dict[str, int]:
    """The FAISS parameters for one setting of the tuned knob of `factory`."""
    if "IVF" in factory:
        params = {"nprobe": value}
        if re.search(r"IVF\d+_HNSW", factory):
            params["quantizer_efSearch"] = max(MIN_QUANTIZER_EF, 2 * value)
        return params
    return {"efSearch": value} if "HNSW" in factory else {}


def tune(factory: str, recall_of: Callable[[dict[str, int]], float], target: float, k: int) -> Tuned:
    """The cheapest setting of `factory`'s knob with recall_of(params) >= target, or the most
    accurate one tried when none reaches it (logged)."""
    nlist = re.search(r"IVF(\d+)", factory)
    low, high = (1, int(nlist.group(1))) if nlist else (max(16, k), MAX_EF_SEARCH) if "HNSW" in factory else (0, 0)
    tuned = Tuned({}, 0.0)

    def measure(value: int) -> float:
        recall = recall_of(search_parameters(factory, value))
        tuned.trials.append((value, recall))
        log.info("%s %s: recall@%d %.4f", factory, search_parameters(factory, value) or "as built", k, recall)
        return recall

    if not high:  # nothing to tune (a flat scan, a factory without a knob)
        return Tuned({}, measure(0), tuned.trials)
    failed, value = low - 1, low
    while (recall := measure(value)) < target and value < high:
        failed, value = value, min(high, 2 * value)
    if recall < target:
        log.warning("recall@%d %.4f at the largest setting (%s): the target %.2f is out of reach of %s", k, recall,
                    search_parameters(factory, value), target, factory)
        return Tuned(search_parameters(factory, value), recall, tuned.trials)
    best = (value, recall)
    while best[0] - failed > 1:  # the smallest passing value lies in (failed, best]
        middle = (failed + best[0]) // 2
        recall = measure(middle)
        if recall >= target:
            best = (middle, recall)
        else:
            failed = middle
    return Tuned(search_parameters(factory, best[0]), best[1], tuned.trials)

