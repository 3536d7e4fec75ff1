"""Top-k retrieval over the cluster: cn_clip's make_topk_predictions.py (t2i) and
make_topk_predictions_tr.py (i2t), exact, with a FAISS index, or with an index
built by jobs/build_index.py.

Exact: the corpus is loaded once into the object store as shards (Parquet row
groups read by tasks, so the driver never holds the corpus); every query block x
corpus shard pair is a Ray task returning a partial top-k, and a merge task per
block combines them. Ties are broken by the smaller id, which makes the merged
ids identical to one brute-force pass. Query blocks stream through a bounded
window and predictions are written in query order.

FAISS (`--index faiss`): a temporary index is built beside the output file through
jobs/build_index.py's code (over the cluster, in bounded memory, its search parameters
tuned to --recall-target), searched as a built index, and deleted; then the recall
of its results against exact search is measured on a random sample of queries and
reported, the corpus streamed shard by shard past the sample (it is never loaded: the
job's memory does not grow with the corpus). On a multi-node cluster the output's folder
must be shared, as for a built index.

A built index (`--index DIR`): the corpus is the index, so only the query
features are read; each query block is a task that memory-maps the index and
searches it with the parameters its build tuned (their recall is in its manifest).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ray

from .. import config as config_io
from ..data.features import Features, FeatureShard, check_unique_ids, iter_feature_blocks, plan_shards
from ..index.recall import recall_at_k
from ..index.search import open_index, read_manifest
from ..index.searcher import ExactSearcher, merge
from ..ray_context import Gauges, ensure_ray, get, node_id
from .predictions import KEYS, MODES, PredictionWriter, check_mode

log = logging.getLogger(__name__)

INDEXES = ("exact", "faiss")  # or the directory of a built index


@dataclass(frozen=True)
class KnnConfig:
    image_feats: str = ""  # image features: cn_clip JSONL, a Parquet file, or a directory of shards
    text_feats: str = ""  # text features, same formats (the corpus side is not needed with --index DIR)
    output: str = ""  # predictions JSONL
    top_k: int = 10  # ids predicted per query
    eval_batch_size: int = 32768  # corpus rows scored per matrix product inside a task (cn_clip's flag)
    mode: Literal[MODES] = "t2i"  # t2i: texts query images; i2t: images query texts
    index: str = "exact"  # exact; faiss (a temporary approximate index); or DIR, an index built by jobs/build_index.py
    query_block_size: int = 4096  # queries per Ray task
    corpus_shard_size: int = 131072  # corpus rows per shard (Parquet: whole row groups; JSONL: one file)
    max_inflight_blocks: int = 4  # query blocks in flight: bounds driver and object-store memory
    faiss_index: str = "auto"  # auto (by corpus size, built fast), flat, hnsw, ivf, or a faiss index_factory string
    recall_target: float = 0.95  # faiss: recall@10 on held-out corpus vectors its search parameters are tuned to
    recall_sample: int = 1000  # faiss: queries re-searched exactly to measure recall (0: skip)
    seed: int = 0  # sampling of the FAISS training rows and the recall queries

    def __post_init__(self):
        check_mode(self.mode)
        if self.index not in INDEXES and not os.path.isdir(self.index):
            raise ValueError(f"--index must be exact, faiss or the directory of an index built by "
                             f"jobs/build_index.py; {self.index!r} is neither")
        corpus = "image_feats" if self.mode == "t2i" else "text_feats"
        for name in ("image_feats", "text_feats", "output"):
            if not getattr(self, name) and not (name == corpus and self.built_index):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        for name in ("top_k", "eval_batch_size", "query_block_size", "corpus_shard_size", "max_inflight_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.recall_sample < 0:
            raise ValueError(f"recall_sample must not be negative, got {self.recall_sample}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"--recall-target must be in (0, 1], got {self.recall_target}")
        config_io.check_not_empty(self.image_feats, "--image-feats")
        config_io.check_not_empty(self.text_feats, "--text-feats")
        # Predictions are written through clip_platform.io (a URI too), but --index faiss builds its
        # temporary index beside them, and FAISS maps it: then --output is local or shared.
        config_io.check_output(self.output, "--output", uri=None if self.index != "faiss" else
                               "--index faiss builds its temporary index beside --output: give a local or shared path")

    @property
    def built_index(self) -> str | None:
        """The directory of a built index to search, or None (exact, faiss)."""
        return None if self.index in INDEXES else self.index

    @property
    def query_path(self) -> str:
        return self.text_feats if self.mode == "t2i" else self.image_feats

    @property
    def corpus_path(self) -> str:
        return self.image_feats if self.mode == "t2i" else self.text_feats

    @property
    def query_key(self) -> str:
        return KEYS[self.mode][0]

    @property
    def corpus_key(self) -> str:
        return "image_id" if self.mode == "t2i" else "text_id"


@dataclass(frozen=True)
class KnnReport:
    output: str
    mode: str
    index: str  # "exact" or the FAISS index description
    num_queries: int
    corpus_size: int
    k: int
    seconds: float  # the whole job
    load_seconds: float  # corpus into the object store
    build_seconds: float  # FAISS index build (0 for exact)
    search_seconds: float  # all query blocks searched and written
    recall: float | None = None  # faiss: mean recall@k against exact search on the sample
    recall_queries: int = 0  # size of that sample
    num_nodes: int = 0  # Ray nodes whose tasks (or FAISS actor) computed the predictions


# ---------------------------------------------------------------- Ray tasks
#
# A node lost mid-job costs time, not results: tasks whose node died are retried
# (max_retries), corpus shards stored on it are rebuilt from their read task
# (lineage reconstruction, which reuses max_retries), and the FAISS actor restarts
# elsewhere and rebuilds its index before answering the retried search. Every
# search result carries the ids of the nodes that computed it, for the report.

RETRIES = 3  # system failures (a node or worker process lost); user errors are never retried


@ray.remote(num_cpus=1, num_returns=2, max_retries=RETRIES)
def _load_shard(shard: FeatureShard) -> tuple[Features, tuple[np.ndarray, int]]:
    """The shard's features (kept in the object store) and its (ids, dim) for the driver's checks."""
    features = shard.read()
    return features, (features.ids, features.dim)


@ray.remote(num_cpus=1, max_retries=RETRIES)
def _partial_topk(queries: np.ndarray, shard: Features | FeatureShard, k: int, chunk_rows: int):
    # A FeatureShard (a streamed corpus) is read here and dropped after.
    scores, ids = ExactSearcher([shard], queries.shape[1], chunk_rows).search(queries, k)
    return scores, ids, (node_id(),)


@ray.remote(num_cpus=1, max_retries=RETRIES)
def _merge(k: int, *parts):
    scores, ids = merge([(scores, ids) for scores, ids, _ in parts], k)
    return scores, ids, tuple(sorted({node for *_, nodes in parts for node in nodes}))


@ray.remote(num_cpus=1, max_retries=RETRIES)
def _search_built(directory: str, queries: np.ndarray, k: int):
    scores, ids = open_index(directory).search(queries, k)
    return scores, ids, (node_id(),)


# ---------------------------------------------------------------- corpus

@dataclass
class Corpus:
    shards: list  # ObjectRefs of Features, one per non-empty shard; or FeatureShards, read by each search task
    num_rows: int
    dim: int


def load_corpus(path: str, id_key: str, shard_rows: int) -> Corpus:
    """Read the corpus into the object store, shard by shard, in parallel tasks; checks
    one dimension and unique ids across all shards."""
    shards = plan_shards(path, shard_rows, id_key)
    pairs = [_load_shard.remote(shard) for shard in shards]
    metas = get([meta for _, meta in pairs])
    dims = {dim for ids, dim in metas if len(ids)}
    if not dims:
        raise ValueError(f"no corpus features in {path}")
    if len(dims) > 1:
        raise ValueError(f"corpus features in {path} have different dimensions: {sorted(dims)}")
    check_unique_ids(np.concatenate([ids for ids, _ in metas]), path)
    refs = [ref for (ref, _), (ids, _) in zip(pairs, metas) if len(ids)]
    return Corpus(refs, sum(len(ids) for ids, _ in metas), dims.pop())


# ---------------------------------------------------------------- the searchers in Ray tasks

class ExactTasks:
    """Query block -> ObjectRef of its exact (scores, ids, node ids): an ExactSearcher task per
    corpus shard, then a merge task (clip_platform.index.searcher's merge)."""

    description = "exact"
    build_seconds = 0.0

    def __init__(self, corpus: Corpus, k: int, chunk_rows: int):
        self.corpus, self.k, self.chunk_rows = corpus, k, chunk_rows

    def submit(self, block: Features):
        queries = ray.put(block.vectors)
        parts = [_partial_topk.remote(queries, shard, self.k, self.chunk_rows) for shard in self.corpus.shards]
        return parts[0] if len(parts) == 1 else _merge.remote(self.k, *parts)

    def close(self) -> None:
        pass


class BuiltIndexTasks:
    """Query block -> ObjectRef of (scores, ids, node ids): a task per block memory-maps the
    index (jobs/build_index.py's folder, which every node must see; `open_index`'s
    IndexSearcher) and searches it."""

    build_seconds = 0.0

    def __init__(self, directory: str, k: int):
        manifest = read_manifest(directory)
        self.num_rows, self.dim = manifest["count"], manifest["dim"]  # stands for the corpus, too
        self.directory, self.k = directory, min(k, self.num_rows)
        self.description = f"index {directory}: {manifest['factory']} {manifest['search_parameters']}"
        log.info("%s, recall@%d %.3f on held-out corpus vectors", self.description, manifest["recall"]["k"],
                 manifest["recall"]["reached"])

    def submit(self, block: Features):
        return _search_built.remote(self.directory, block.vectors, self.k)

    def close(self) -> None:
        pass


class TemporaryIndexTasks(BuiltIndexTasks):
    """`--index faiss`: an index built by jobs/build_index.py's code in a folder beside the
    output, searched like a built one, deleted when the job ends."""

    def __init__(self, config: KnnConfig, k: int):
        from ..index import IndexConfig
        from ..index.build import build_index

        kind = "fast" if config.faiss_index == "auto" else config.faiss_index  # fast: temporary_factory's choice
        folder = os.path.dirname(os.path.abspath(config.output))
        self.temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(config.output)}.faiss-", dir=folder)
        try:
            log.info("building a temporary FAISS index (%s) over %s in %s", kind, config.corpus_path, self.temporary)
            report = build_index(IndexConfig(
                (config.corpus_path,), os.path.join(self.temporary, "index"), index=kind, max_index_memory="1TB",
                recall_target=config.recall_target, rows_per_shard=config.corpus_shard_size, seed=config.seed))
            super().__init__(report.output, k)
        except BaseException:
            self.close()
            raise
        self.build_seconds = report.seconds
        self.description = f"faiss {report.factory} {report.search_parameters}"

    def close(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)


def in_order(blocks: Iterable[Features], submit: Callable, window: int) -> Iterator[tuple[Features, tuple]]:
    """(block, result) in input order, with at most `window` blocks submitted and unfinished."""
    pending: deque = deque()
    for block in blocks:
        pending.append((block, submit(block)))
        if len(pending) >= window:
            head, ref = pending.popleft()
            yield head, get(ref)
    while pending:
        head, ref = pending.popleft()
        yield head, get(ref)


def _checked_blocks(blocks: Iterable[Features], dim: int, path: str) -> Iterator[Features]:
    for block in blocks:
        if block.dim != dim:
            raise ValueError(f"query features in {path} have {block.dim} dimensions, the corpus has {dim}")
        yield block


# ---------------------------------------------------------------- recall of approximate search

class QuerySample:
    """A uniform random sample of up to `size` queries from a stream of blocks, with
    their approximate results: each row gets a random key and the smallest keys stay."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.zeros(0)
        self.queries = Features.empty()
        self.results = np.zeros((0, 0), np.int64)

    def add(self, block: Features, results: np.ndarray) -> None:
        if not self.size:
            return
        keys = np.concatenate([self.keys, self.rng.random(len(block))])
        queries = Features.concat([self.queries, block])
        results = np.concatenate([self.results, results]) if len(self.results) else results
        keep = np.argsort(keys, kind="stable")[: self.size]
        self.keys, self.queries, self.results = keys[keep], Features(queries.ids[keep], queries.vectors[keep]), \
            results[keep]


# ---------------------------------------------------------------- the job

def knn_search(config: KnnConfig) -> KnnReport:
    """Write the top-k predictions of every query to `config.output` (cn_clip's JSONL)."""
    ensure_ray()
    start = time.perf_counter()
    search = corpus = exact = None
    if config.built_index:
        search = corpus = BuiltIndexTasks(config.built_index, config.top_k)
    elif config.index == "faiss":  # the index stands for the corpus, streamed past the recall sample
        search = TemporaryIndexTasks(config, config.top_k)
        shards = plan_shards(config.corpus_path, config.corpus_shard_size, config.corpus_key)
        corpus = Corpus([shard for shard in shards if shard.num_rows], search.num_rows, search.dim)
    else:
        corpus = load_corpus(config.corpus_path, config.corpus_key, config.corpus_shard_size)
    loaded = time.perf_counter()
    nodes: set[str] = set()
    try:
        k = min(config.top_k, corpus.num_rows)
        if k < config.top_k:
            log.warning("the corpus has only %d entries: predicting %d per query, not %d", corpus.num_rows, k,
                        config.top_k)
        blocks = _checked_blocks(iter_feature_blocks(config.query_path, config.query_block_size, config.query_key),
                                 corpus.dim, config.query_path)
        if not config.built_index:
            exact = ExactTasks(corpus, k, config.eval_batch_size)
        search = search or exact
        sample = QuerySample(config.recall_sample if config.index == "faiss" else 0, config.seed)
        searched = time.perf_counter()
        gauges = Gauges("clip_knn", {"queries_done": "queries predicted", "queries_per_s": "queries per second"},
                        mode=config.mode)
        with PredictionWriter(config.output, config.mode) as writer:
            for block, (_, ids, block_nodes) in in_order(blocks, search.submit, config.max_inflight_blocks):
                nodes.update(block_nodes)
                writer.write(block.ids.tolist(), ids.tolist())
                sample.add(block, ids)
                log.info("%d queries done", writer.num_lines)
                gauges.set(queries_done=writer.num_lines,
                           queries_per_s=writer.num_lines / max(1e-9, time.perf_counter() - searched))
    finally:
        if search is not None:
            search.close()
    written = time.perf_counter()
    recall = None
    if len(sample.queries):
        _, exact_ids, _ = get(exact.submit(sample.queries))
        recall = recall_at_k(sample.results, exact_ids)
        log.info("%s: recall@%d vs exact on %d sampled queries = %.4f", search.description, k,
                 len(sample.queries), recall)
    report = KnnReport(config.output, config.mode, search.description, writer.num_lines, corpus.num_rows, k,
                       seconds=time.perf_counter() - start, load_seconds=loaded - start - search.build_seconds,
                       build_seconds=search.build_seconds, search_seconds=written - searched, recall=recall,
                       recall_queries=len(sample.queries), num_nodes=len(nodes))
    log.info("top-%d %s predictions for %d queries over %d entries -> %s (%.1f s, %d node(s))", k, config.mode,
             report.num_queries, report.corpus_size, config.output, report.seconds, report.num_nodes)
    return report
