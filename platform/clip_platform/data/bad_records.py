"""Counting and reporting skipped records across Ray workers.

Readers and stages skip a bad record and hand a `BadRecord` to a sink: a
`BadRecordCounter` in-process (plain loops, tests), or a `BadRecordLog`, a
handle on one small Ray actor that every read task and `map_batches` worker
reports to, so the job's summary sees the records skipped anywhere in the
cluster. Counts are exact; only the first `max_examples` records of each kind
are kept, so memory stays bounded whatever the data.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .records import MISSING_IMAGE, BadRecord

log = logging.getLogger(__name__)


class BadRecordSink(Protocol):
    def report(self, records: Iterable[BadRecord]) -> None: ...


@dataclass
class BadRecordSummary:
    """What was skipped: counts per kind, the first records of each kind, and notes."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[BadRecord]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(self.counts.values())

    def ids(self, kind: str | None = None) -> list[Any]:
        """Ids of the kept example records (all of them while under max_examples)."""
        kinds = [kind] if kind else list(self.examples)
        return [r.id for k in kinds for r in self.examples.get(k, [])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_bad": self.num_bad,
            "counts": dict(self.counts),
            "examples": {k: [{"id": r.id, "where": r.where, "detail": r.detail} for r in v]
                         for k, v in self.examples.items()},
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        if not self.num_bad:
            text = "no bad records"
        else:
            parts = []
            for kind, count in sorted(self.counts.items()):
                ids = [str(r.id) for r in self.examples.get(kind, []) if r.id is not None][:10]
                more = ", ..." if count > len(ids) and ids else ""
                parts.append(f"{kind}: {count}" + (f" (ids {', '.join(ids)}{more})" if ids else ""))
            text = f"{self.num_bad} bad record(s) skipped; " + "; ".join(parts)
        return "; ".join([text, *self.notes])


class _JoinCheck:
    """Which referenced image ids a streamed join has seen, to name the missing
    ones once every read task of some planning of the read has finished."""

    def __init__(self, where: str, referenced: np.ndarray):
        self.where = where
        self.referenced = np.unique(referenced)
        self.seen = np.empty(0, dtype=np.int64)
        self.done: dict[int, set[int]] = defaultdict(set)  # num_tasks -> finished task indices

    def add(self, task_index: int, num_tasks: int, seen: np.ndarray) -> None:
        self.seen = np.union1d(self.seen, seen)
        self.done[num_tasks].add(task_index)

    @property
    def complete(self) -> bool:
        return any(len(tasks) == n for n, tasks in self.done.items())

    def missing(self) -> np.ndarray:
        return np.setdiff1d(self.referenced, self.seen)


class BadRecordCounter:
    """In-process sink; also the state of the `BadRecordLog` actor."""

    def __init__(self, max_examples: int = 100):
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[BadRecord]] = defaultdict(list)
        self.joins: dict[str, _JoinCheck] = {}

    def report(self, records: Iterable[BadRecord]) -> None:
        for record in records:
            self.counts[record.kind] += 1
            kept = self.examples[record.kind]
            if len(kept) < self.max_examples:
                kept.append(record)

    def expect_images(self, name: str, where: str, referenced: np.ndarray) -> None:
        """Register the image ids a join's texts reference (idempotent per name)."""
        if name not in self.joins:
            self.joins[name] = _JoinCheck(where, np.asarray(referenced, dtype=np.int64))

    def saw_images(self, name: str, task_index: int, num_tasks: int, seen: np.ndarray) -> None:
        if name in self.joins:
            self.joins[name].add(task_index, num_tasks, np.asarray(seen, dtype=np.int64))

    def summary(self) -> BadRecordSummary:
        counts, examples = Counter(self.counts), {k: list(v) for k, v in self.examples.items()}
        notes = []
        for check in self.joins.values():
            if not check.complete:
                # Until every image line was read, an unseen id may still come.
                notes.append(f"missing-image check for {check.where} pending: the images were not read to the end")
                continue
            missing = check.missing()
            if len(missing):
                counts[MISSING_IMAGE] += len(missing)
                kept = examples.setdefault(MISSING_IMAGE, [])
                for image_id in missing[: max(0, self.max_examples - len(kept))]:
                    kept.append(BadRecord(MISSING_IMAGE, int(image_id), check.where,
                                          "referenced by texts, absent from the images"))
        return BadRecordSummary(dict(counts), examples, notes)


class BadRecordLog:
    """A `BadRecordCounter` in a Ray actor (0 CPUs), shared by every worker.

        bad = BadRecordLog()
        ds = read_pairs(path, bad_records=bad).map_batches(DecodeStage(224, bad_records=bad))
        ...consume ds...
        print(bad.summary())

    Reports block until recorded, so a summary taken after the data was
    consumed includes every skipped record."""

    def __init__(self, max_examples: int = 100):
        import ray

        self._actor = ray.remote(num_cpus=0)(BadRecordCounter).remote(max_examples)

    def report(self, records: Iterable[BadRecord]) -> None:
        records = list(records)
        if records:
            import ray

            ray.get(self._actor.report.remote(records))

    def expect_images(self, name: str, where: str, referenced: np.ndarray) -> None:
        import ray

        ray.get(self._actor.expect_images.remote(name, where, referenced))

    def saw_images(self, name: str, task_index: int, num_tasks: int, seen: np.ndarray) -> None:
        import ray

        ray.get(self._actor.saw_images.remote(name, task_index, num_tasks, seen))

    def summary(self) -> BadRecordSummary:
        import ray

        return ray.get(self._actor.summary.remote())


def report(sink: BadRecordSink | None, records: list[BadRecord]) -> None:
    """Hand skipped records to the sink; without one, they still reach the worker's log."""
    if not records:
        return
    if sink is not None:
        sink.report(records)
    else:
        for record in records[:20]:
            log.warning("skipped %s", record)
        if len(records) > 20:
            log.warning("skipped %d more bad records", len(records) - 20)
