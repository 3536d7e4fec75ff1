"""Persistent retrieval indexes at corpus scale, and the one search interface.

Built over the cluster from the embed job's feature shards (`build.build_index`,
jobs/build_index.py), memory-mapped when searched (`open_index`). One concern per module:

* `searcher`     the `Searcher` interface (search, lookup, vectors), exact search over feature
                 shards, one FAISS shard, and the fan-out + top-k merge over parts
* `search`       a built index as a Searcher (`IndexSearcher`, `open_index`)
* `topk`         exact top-k with ties broken by id, mergeable across parts
* `recall`       the hit rule: cn_clip's R@1/5/10, and recall@k against exact search
* `faiss_index`  which FAISS index to build for a corpus and a memory budget
* `config` (the flags), `sources` (the input files), `metadata` (the id table), `vectors` (the
  stored vectors), `workdir` (the output folder and resumable state), `tasks` (the Ray tasks),
  `tune` (search parameters), `build` (the driver), `update` (--add, --remove-ids)
"""
from .config import IndexConfig
from .search import IndexSearcher, open_index
from .searcher import ExactSearcher, Searcher

__all__ = ["ExactSearcher", "IndexConfig", "IndexSearcher", "Searcher", "open_index"]
