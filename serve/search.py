"""Search over a persistent index built by jobs/build_index.py, memory-mapped: the index's
Searcher (clip_platform.index) in Serve.

The index's shards are spread over `SearchDeployment`s (one per group of shards; each
deployment's replicas open only their group's shards, memory-mapped, so no replica holds the
corpus and Serve places the groups on any node). The Gateway asks its `SearchFanOut`, which
fans the query out to every group and merges their top-k with the index's own merge; with
search_replicas 0 the route searches the Gateway's own mapped index instead. The id table and
the stored vectors (more like this) are read memory-mapped by the Gateway.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
from ray import serve

log = logging.getLogger("serve")
MAX_QUERIES_PER_CALL = 64  # requests one FAISS call answers together


@serve.deployment(name="Search")
class SearchDeployment:
    """A replica holding some shards of the index, memory-mapped."""

    def __init__(self, directory: str, shards: Sequence[int]):
        from clip_platform.index import open_index

        self.index = open_index(directory, list(shards))
        log.info("serving shards %s of %s (%d vectors)", list(shards), directory,
                 sum(shard.ntotal for shard in self.index.shards))

    async def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, k] over this replica's shards."""
        return await self._search_together(queries, k)

    @serve.batch(max_batch_size=MAX_QUERIES_PER_CALL, batch_wait_timeout_s=0.0)
    async def _search_together(self, queries: list[np.ndarray], ks: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The requests waiting at this moment (no wait is added: under load they queue while
        a search runs) in one FAISS call per distinct k, which runs in a thread (FAISS releases
        the GIL, so the event loop keeps taking requests meanwhile)."""
        out: list = [None] * len(queries)
        for k in set(ks):
            which = [i for i, asked in enumerate(ks) if asked == k]
            scores, ids = await asyncio.to_thread(self.index.search, np.concatenate([queries[i] for i in which]), k)
            row = 0
            for i in which:
                n = len(queries[i])
                out[i] = scores[row:row + n], ids[row:row + n]
                row += n
        return out


class SearchFanOut:
    """What the Gateway searches: the Search deployments' handles, asked together and their
    answers merged; or (no handles) the Gateway's own index, searched in a thread (FAISS releases
    the GIL: the event loop keeps answering while it scans)."""

    def __init__(self, index, handles: Sequence = ()):
        self.index, self.handles = index, list(handles)

    async def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from clip_platform.index.searcher import merge

        if not self.handles:
            return await asyncio.to_thread(self.index.search, queries, k)
        return merge(await asyncio.gather(*[handle.search.remote(queries, k) for handle in self.handles]), k)


def shard_groups(num_shards: int, num_groups: int) -> list[list[int]]:
    """Index shards dealt over `num_groups` search deployments (0: one per shard)."""
    num_groups = min(num_groups or num_shards, num_shards)
    return [list(range(num_shards))[g::num_groups] for g in range(num_groups)]
