"""The vectors of an index, kept beside it in float16 (on unless --no-store-vectors): what
re-ranks compressed codes exactly enough, and what "more like this" searches with. One
.npy file per segment (the build's, then one per --add), rows in the order the shards
were planned, written in place by the encoding tasks; the id table gives each id's row
(its position). Read memory-mapped: a process touches the rows it asks for."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DTYPE = np.float16


def segment_file(segment: int) -> str:
    return f"vectors-{segment:05d}.npy"


def create_segment(path: str | os.PathLike, rows: int, dim: int) -> None:
    """An empty (sparse) segment of rows x dim for the encoding tasks to fill; one of that
    shape left by an interrupted build is kept, with the rows its finished tasks wrote."""
    path = Path(path)
    if path.is_file():
        try:
            if np.load(path, mmap_mode="r").shape == (rows, dim):
                return
        except ValueError:
            pass
    np.lib.format.open_memmap(path, "w+", DTYPE, (rows, dim)).flush()


def write_rows(path: str | os.PathLike, first: int, vectors: np.ndarray) -> None:
    """Rows first.. of a segment (a retried task writes the same bytes again)."""
    segment = np.load(path, mmap_mode="r+")
    segment[first:first + len(vectors)] = vectors.astype(DTYPE)
    segment.flush()
    del segment


class VectorStore:
    """Reads stored vectors by position across the segments of `segments` (the manifest's
    [{"file", "first", "rows"}])."""

    def __init__(self, directory: str | os.PathLike, segments: Sequence[dict]):
        self.maps = [np.load(Path(directory) / s["file"], mmap_mode="r") for s in segments]
        self.firsts = np.asarray([s["first"] for s in segments], np.int64)

    def get(self, positions: np.ndarray) -> np.ndarray:
        """float32 [n, dim] of the vectors at `positions` (each >= 0)."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.maps[0].shape[1]), np.float32)
        which = np.searchsorted(self.firsts, positions, side="right") - 1
        for segment in np.unique(which).tolist():
            rows = which == segment
            local = positions[rows] - self.firsts[segment]
            order = np.argsort(local)  # ascending offsets: sequential reads where rows are near
            values = np.empty((len(local), out.shape[1]), np.float32)
            values[order] = self.maps[segment][local[order]]
            out[rows] = values
        return out
