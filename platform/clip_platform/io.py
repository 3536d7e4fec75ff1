"""Writing files so that a reader never sees half of one: the platform's one atomic
writer. Every output of the batch jobs and the training run's own files go through
`atomic_path`: a crashed or preempted task leaves the previous file (or none), so a
resumed job can trust any file it finds."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path next to `path`, renamed onto it only if the block succeeds:
    readers (and resumed jobs) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """UTF-8 text from `lines` (each with its own newline), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(lines)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any, **options) -> Path:
    """One JSON document, written atomically; `options` go to json.dump (default
    ensure_ascii=False, so Chinese stays readable; cn_clip's byte-exact files pass True)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        json.dump(payload, out, **{"ensure_ascii": False, **options})
    return Path(path)
