"""Building a persistent retrieval index over the cluster, in bounded memory.

    scan      one task per feature shard: checks it, writes its ids as a sorted run, keeps a
              random sample of its rows                       -> _build/scan/
    metadata  one task merges the runs into the id -> (file, row, path, vector position)
              table; a duplicate id stops the build here, named with both places
                                                              -> metadata.arrow, ids.npy
    choose    the index, from the corpus size and --max-index-memory (faiss_index.py)
    train     one task draws the tuning queries (corpus rows, held out of training; each is
              left out of its own results when recall is measured) and the training rows from the
              samples and trains the empty index              -> trained.index
    encode    one task per shard: its rows added to a copy of the trained index (a partial
              index), the exact top-10 of the tuning queries over its rows -> _build/parts/,
              and its rows written in float16 to their place in   -> vectors-00000.npy
    merge     one task per index shard: the partials' inverted lists merged onto disk
              (faiss.contrib.ondisk)                          -> populated.index + merged.ivfdata
    tune      one task: nprobe / efSearch raised until recall@10 against exact reaches the target
              (PQ codes: with their candidates re-scored from the stored vectors)
    manifest  written last                                    -> manifest.json

No process holds the corpus: a task holds one shard (--rows-per-shard rows), the training
sample is bounded by bytes, and merging maps the partials. Indexes FAISS cannot merge on
disk (HNSW, fast-scan codes) are filled in one task that holds the index, as served.
Every step writes its files atomically and the driver records each finished shard, so an
interrupted build started again keeps them. The output folder must be reachable from
every node (a shared filesystem) on a multi-node cluster.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray

from .faiss_index import FaissSpec, choose_served_index, mergeable_on_disk
from ..ray_context import Gauges, ensure_ray, get, largest_node_cpus, task_cpus
from .topk import merge_topk
from . import tasks
from .config import IndexConfig
from .metadata import table_files
from .sources import Inputs, plan_inputs
from .vectors import create_segment, segment_file
from .workdir import BuildDir, index_files

log = logging.getLogger(__name__)

TUNE_K = 10  # recall@10, as the issue and autofaiss measure it
PROGRESS_SECONDS = 15


@dataclass(frozen=True)
class IndexReport:
    output: str
    count: int
    dim: int
    factory: str
    num_shards: int
    search_parameters: dict
    recall: float  # recall@10 against exact search on the held-out tuning queries (their mean)
    recall_target: float
    tune_queries: int
    index_bytes: int
    seconds: float
    reused: int = 0  # shard steps (scans, partial indexes) a resumed build found finished
    num_nodes: int = 0
    added: int = 0  # --add: vectors added
    removed: int = 0  # --remove-ids: ids removed
    not_found: int = 0  # --remove-ids: ids not in the index (removed before, or never added)
    bad_lines: int = 0  # --remove-ids: lines that are no id, skipped


def build_index(config: IndexConfig) -> IndexReport:
    """Build (or finish building) the index of `config.features` in `config.output`."""
    start = time.perf_counter()
    inputs = plan_inputs(config.features, config.rows_per_shard)
    work = BuildDir(config.output)
    plan = {"sources": inputs.sources, "settings": {k: v for k, v in asdict(config).items()
                                                     if k not in ("features", "output")}}
    plan["settings"]["features"] = list(config.features)
    done = work.start(plan)
    if done is not None:
        log.info("%s holds this index already", config.output)
        return report_of(config, done, 0.0, 0, set())
    ensure_ray()
    nodes: set[str] = set()
    reused = 0

    scans, found = run_shards(work, "scan", len(inputs.shards), lambda i: tasks.scan_shard.remote(
        inputs.shards[i], inputs.shard_sources[i], work.path("scan", i, ".ids.parquet"),
        work.path("scan", i, ".sample.npz"), inputs.known_rows, config.train_bytes, config.tune_queries, config.seed,
        i), record_scan)
    reused += found
    nodes.update(s["node"] for s in scans.values())
    num_rows, dim = _corpus_shape(inputs, scans, config.features)
    live = [i for i in range(len(inputs.shards)) if scans[i]["rows"]]
    firsts = shard_positions(inputs.shards, scans)

    tables = table_files(0)
    if not (work.root / tables["table"]).is_file():
        runs = [work.path("scan", i, ".ids.parquet") for i in range(len(inputs.shards))]
        offsets = [firsts[i] - shard.first_row for i, shard in enumerate(inputs.shards)]
        get(tasks.merge_metadata.remote(runs, offsets, [s["path"] for s in inputs.sources], work.root))
    log.info("metadata of %d ids written (no id twice)", num_rows)
    vectors = work.root / segment_file(0) if config.store_vectors else None
    if vectors is not None:
        create_segment(vectors, num_rows, dim)

    spec, num_shards = choose_served_index(num_rows, dim, config.memory_bytes, config.index, config.num_shards,
                                           config.train_bytes)
    on_disk = mergeable_on_disk(spec.factory)
    num_shards = min(num_shards, len(live)) if on_disk else 1
    tasks.new_index(spec.factory, dim)  # a bad factory string fails here, before training
    num_queries = min(config.tune_queries, max(1, num_rows // 10))
    log.info("index %s over %d x %d in %d shard(s); %d tuning queries", spec.factory, num_rows, dim, num_shards,
             num_queries)
    threads = largest_node_cpus()
    if not work.trained.is_file() or not work.queries.is_file():
        samples = [work.path("scan", i, ".sample.npz") for i in live]
        trained_on = get(tasks.train.options(num_cpus=task_cpus(threads)).remote(
            spec.factory, dim, samples, num_queries, spec.train_rows, work.trained, work.queries, threads))
        log.info("trained on %d sampled rows", trained_on)

    parts, found = run_shards(work, "parts", len(inputs.shards), lambda i: tasks.encode_shard.remote(
        inputs.shards[i], work.queries, work.path("parts", i, ".exact.npz"), TUNE_K, work.trained,
        work.path("parts", i, ".index") if on_disk and scans[i]["rows"] else None, vectors, firsts[i]),
        record_partial)
    reused += found
    nodes.update(p["node"] for p in parts.values())
    with np.load(work.queries) as saved:
        exact_ids = tasks.others(_exact_topk(work, len(inputs.shards)), saved["ids"], TUNE_K)

    began = time.monotonic()
    shards = _write_index(work, inputs, spec, on_disk, live, num_shards, threads)
    log.info("index files written in %.1f s (%s)", time.monotonic() - began,
             "partial indexes merged on disk" if on_disk else "filled in one task")
    began = time.monotonic()
    manifest = {
        "format": "clip_platform index", "count": num_rows, "dim": dim, "metric": "inner_product",
        "factory": spec.factory, "layout": "ondisk" if on_disk else "memory", "search_parameters": {},
        "shards": shards, "metadata": tables, "trained": work.trained.name, "generation": 0, "removed": None,
        "vectors": {"dtype": "float16", "segments": [{"file": vectors.name, "first": 0, "rows": num_rows}]}
        if vectors is not None else None,
        "sources": [{**s, "rows": sum(scans[i]["rows"] for i in range(len(inputs.shards))
                                      if inputs.shard_sources[i] == n)} for n, s in enumerate(inputs.sources)],
        "model": inputs.model, "build": plan}
    tuned = get(tasks.tune_index.remote(work.root, manifest, work.queries, exact_ids, config.recall_target, TUNE_K))
    manifest.update(search_parameters=tuned["params"],
                    recall={"k": TUNE_K, "target": config.recall_target, "reached": tuned["recall"],
                            "lower_bound": tuned["lower_bound"], "queries": num_queries, "trials": tuned["trials"]})
    log.info("%s: recall@%d %.4f (95%% lower bound %.4f) with %s (target %.2f), tuned in %.1f s", spec.factory,
             TUNE_K, tuned["recall"], tuned["lower_bound"], tuned["params"], config.recall_target,
             time.monotonic() - began)
    work.finish(manifest)
    return report_of(config, manifest, time.perf_counter() - start, reused, nodes)


# ---------------------------------------------------------------- shard steps

def record_scan(work: BuildDir, shard: int, result: dict) -> None:
    work.write_record("scan", shard, result)


def record_partial(work: BuildDir, shard: int, result: dict) -> None:
    """Mark shard's partial index (and exact top-k) finished: a resumed build keeps it."""
    work.write_record("parts", shard, result)


INDEX_GAUGES = {"shards_done": "shards of the step done", "shards_todo": "shards of the step",
                "rows_done": "rows of the finished shards"}


def run_shards(work: BuildDir, step: str, num_shards: int, submit: Callable[[int], Any],
                record: Callable[[BuildDir, int, dict], None]) -> tuple[dict[int, dict], int]:
    """Run `step` on every shard without a record yet, recording each as it finishes;
    returns (every shard's record, how many were found finished)."""
    results = {i: r for i in range(num_shards) if (r := work.record(step, i)) is not None}
    found = len(results)
    refs = {submit(i): i for i in range(num_shards) if i not in results}
    log.info("%s: %d shard(s) to do, %d finished before", step, len(refs), found)
    began = last = time.monotonic()
    gauges = Gauges("clip_index", INDEX_GAUGES, step=step)
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            shard = refs.pop(ready[0])
            results[shard] = get(ready[0])
            record(work, shard, results[shard])
            gauges.set(shards_done=len(results), shards_todo=num_shards,
                       rows_done=sum(r.get("rows", 0) for r in results.values() if isinstance(r, dict)))
            if time.monotonic() - last > PROGRESS_SECONDS:
                log.info("%s: %d of %d shards done", step, len(results), num_shards)
                last = time.monotonic()
    finally:
        for ref in refs:  # interrupted or failed: stop the rest, their finished files stay
            ray.cancel(ref)
    log.info("%s: %d shard(s) done in %.1f s", step, num_shards - found, time.monotonic() - began)
    return results, found


def shard_positions(shards: Sequence, scans: dict[int, dict], first: int = 0) -> list[int]:
    """Each shard's first row in the vector store: the shards' rows one after another, from `first`."""
    return (first + np.cumsum([0] + [scans[i]["rows"] for i in range(len(shards))])[:-1]).tolist()


def _corpus_shape(inputs: Inputs, scans: dict[int, dict], paths: Sequence[str]) -> tuple[int, int]:
    num_rows = sum(s["rows"] for s in scans.values())
    dims = {s["dim"]: inputs.shards[i].path for i, s in scans.items() if s["rows"]}
    if not num_rows:
        raise ValueError(f"no features in {' '.join(paths)}: nothing to index")
    if len(dims) > 1:
        (a, file_a), (b, file_b) = list(dims.items())[:2]
        raise ValueError(f"features of different dimensions: {a} in {file_a}, {b} in {file_b}")
    return num_rows, dims.popitem()[0]


def _exact_topk(work: BuildDir, num_shards: int) -> np.ndarray:
    """The tuning queries' exact top-(k+1) ids (themselves included), merged from every shard's."""
    best = None
    for shard in range(num_shards):
        with np.load(work.path("parts", shard, ".exact.npz")) as part:
            found = (part["scores"], part["ids"])
        best = found if best is None else merge_topk([best, found], TUNE_K + 1)
    return best[1]


def _write_index(work: BuildDir, inputs: Inputs, spec: FaissSpec, on_disk: bool, live: Sequence[int],
                 num_shards: int, threads: int) -> list[dict]:
    """The served index files: the partials merged onto disk, split into `num_shards`
    contiguous groups, or the whole index filled in one task."""
    if not on_disk:
        name = "index.faiss"
        count = get(tasks.build_whole.options(num_cpus=task_cpus(threads)).remote(
            [inputs.shards[i] for i in live], work.trained, work.root / name, threads))
        return [{"index": name, "count": count, "bytes": tasks.file_bytes([work.root / name])}]
    groups = np.array_split(np.asarray(live), num_shards)
    refs, shards = [], []
    for number, group in enumerate(groups):
        index_name, data_name = index_files(number, num_shards)
        parts = [work.path("parts", i, ".index") for i in group.tolist()]
        refs.append(tasks.merge_parts.remote(work.trained, parts, work.root / index_name, work.root / data_name))
        shards.append({"index": index_name, "ivfdata": data_name})
    for shard, count in zip(shards, get(refs)):
        shard.update(count=count, bytes=tasks.file_bytes([work.root / shard["index"], work.root / shard["ivfdata"]]))
    return shards


def report_of(config: IndexConfig, manifest: dict, seconds: float, reused: int, nodes: set[str]) -> IndexReport:
    return IndexReport(config.output, manifest["count"], manifest["dim"], manifest["factory"],
                       len(manifest["shards"]), manifest["search_parameters"], manifest["recall"]["reached"],
                       manifest["recall"]["target"], manifest["recall"]["queries"],
                       sum(s["bytes"] for s in manifest["shards"]), seconds, reused, len(nodes))
