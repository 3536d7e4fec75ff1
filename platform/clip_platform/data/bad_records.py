"""Counting and reporting skipped records.

Readers skip a bad record and hand a `BadRecord` to a sink: a `BadRecordCounter`
(the LMDB builder, the embed job's summaries), a list of one shard's records (the
embed job's reader), or none, which logs them on the worker. Counts are exact; only
the first `max_examples` records of each kind are kept, so memory stays bounded
whatever the data.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .records import BadRecord

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
            "examples": {k: [r.to_dict() for r in v] for k, v in self.examples.items()},
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


class BadRecordCounter:
    """In-process sink: counts by kind and the first records of each kind."""

    def __init__(self, max_examples: int = 100):
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[BadRecord]] = defaultdict(list)

    def report(self, records: Iterable[BadRecord]) -> None:
        for record in records:
            self.counts[record.kind] += 1
            kept = self.examples[record.kind]
            if len(kept) < self.max_examples:
                kept.append(record)

    def summary(self) -> BadRecordSummary:
        return BadRecordSummary(dict(self.counts), {k: list(v) for k, v in self.examples.items()})


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
