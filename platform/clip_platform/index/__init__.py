"""Persistent retrieval indexes at corpus scale: built over the cluster from the embed job's
feature shards (`build.build_index`, jobs/build_index.py), memory-mapped when searched
(`open_index`). One concern per module: config (the flags), sources (the input files),
metadata (the id table), workdir (the output folder and resumable state), tasks (the Ray
tasks), tune (search parameters), search (the reader), build (the driver)."""
from .config import IndexConfig
from .search import ServedIndex, open_index

__all__ = ["IndexConfig", "ServedIndex", "open_index"]
