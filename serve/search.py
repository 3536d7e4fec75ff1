"""Search over a persistent index built by jobs/build_index.py, memory-mapped.

The index's shards are spread over `Search` deployments (one per group of shards; each
deployment's replicas open only their group's shards, memory-mapped, so no replica holds the
corpus and Serve places the groups on any node). The Gateway embeds the query, fans it out
to every group and merges their top-k; the id table and the stored vectors (more like this)
are read memory-mapped by the Gateway.

An index is searched with the model whose features it holds: the embed job records that
model's fingerprint and the build copies it into the manifest. A served checkpoint with the
same fingerprint (architecture, checkpoint file names and sizes) is the index's model; an
index of another model is refused at start; an index without a fingerprint is served with
the default model and a warning.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
from ray import serve

from .config import ServeConfig

log = logging.getLogger("serve")
MAX_QUERIES_PER_CALL = 64  # requests one FAISS call answers together


@serve.deployment(name="Search")
class Search:
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


def shard_groups(num_shards: int, num_groups: int) -> list[list[int]]:
    """Index shards dealt over `num_groups` search deployments (0: one per shard)."""
    num_groups = min(num_groups or num_shards, num_shards)
    return [list(range(num_shards))[g::num_groups] for g in range(num_groups)]


def _same_weights(a: dict, b: dict) -> bool:
    """Fingerprints (clip_platform.model_info.inspect_model) of the same weights: the same
    architecture and checkpoint files by name and size. The source as typed (a relative or
    absolute path, a released name) and the files' times may differ: a copied checkpoint is
    the same model."""
    def files(fingerprint):
        return sorted((name, size) for name, size, *_ in fingerprint.get("files", []))

    return a.get("name") == b.get("name") and files(a) == files(b)


def index_model(config: ServeConfig) -> str | None:
    """The served model whose features the index holds (None without an index). ValueError,
    in one line, when the index holds another model's features or vectors of another size."""
    if not config.index:
        return None
    from clip_platform.model_info import inspect_model
    from clip_platform.index.search import read_manifest

    manifest = read_manifest(config.index)
    models = {name: inspect_model(source) for name, source in config.checkpoints.items()}
    recorded = manifest.get("model")
    if recorded is None:
        name = config.default_model
        log.warning("the index %s records no model (its features were not written by jobs/embed.py): searched "
                    "with %r, whose features must be those it holds", config.index, name)
    else:
        name = next((n for n, info in models.items() if _same_weights(info.fingerprint, recorded)), None)
        if name is None:
            served = ", ".join(f"{n} ({info.name}, {info.source})" for n, info in models.items())
            raise ValueError(f"the index {config.index} holds features of {recorded.get('name')} "
                             f"({recorded.get('source')}), not of a served checkpoint: {served}")
    if models[name].embed_dim != manifest["dim"]:
        raise ValueError(f"the index {config.index} holds {manifest['dim']}-dimensional vectors; model {name!r} "
                         f"makes {models[name].embed_dim}")
    return name
