"""Index benchmark: jobs/build_index.py over clustered 512-d features written as the embed
job's Parquet shards, the whole job (Ray included) inside a memory cgroup; then the built
index searched one query at a time, against exact search in the same run.

    python benchmarks/index.py                          # 4M x 512 (8 GiB of float32), 4 GiB for the job
    python benchmarks/index.py --rows 1000000 --memory-limit 2GiB    # quicker (~6 min on 2 cores)

Features: ClusteredEmbeddings of benchmarks/knn.py (points near a 32-d manifold of 2000
clusters, normalised), ids 0..N-1, in shards of 100k rows; generated once into --workdir
and reused (--fresh writes them again). The queries are 1000 more points drawn the same way,
not in the corpus. Their exact top-10 (brute force over every shard) is the ground truth.

Memory: the benchmark moves itself into a new memory cgroup (v1, /sys/fs/cgroup/memory; needs
root) with memory.limit_in_bytes = --memory-limit before Ray starts, so every Ray process
(GCS, raylet, workers, the object store's shared memory) is held to it: the build runs within
the limit or is killed. Reported, sampled every 0.2 s: the cgroup's peak of held memory
(anonymous + shared, the object store included), the same plus memory-mapped files (page cache
the kernel reclaims under the limit, as it does the rest of the page cache counted in the
cgroup's peak usage), and the sum of the processes' RSS as psutil sees it (an upper bound:
shared pages count once per process). Without a cgroup, only psutil's sum.

Search: single-threaded (faiss.omp_set_num_threads(1)), one query per call, the index
memory-mapped as served: QPS, p50 and p99 latency; the baseline is exact search of the
same queries over the same corpus, also one thread (timed on a sample, per query).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn import DIM, ClusteredEmbeddings, write_shards  # noqa: E402  (benchmarks/ is no package)

from clip_platform.data.features import iter_feature_blocks  # noqa: E402
from clip_platform.index.recall import recall_at_k  # noqa: E402
from clip_platform.index.topk import exact_topk, merge_topk  # noqa: E402
from clip_platform.index import IndexConfig, open_index  # noqa: E402
from clip_platform.index.build import build_index  # noqa: E402
from clip_platform.index.config import parse_bytes  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")
SHARD_ROWS = 100_000
K = 10
TARGET_RECALL = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000, help="corpus vectors (default 4M: 8 GiB of float32)")
    parser.add_argument("--memory-limit", default="4GiB", help="memory cgroup limit of the whole job (default 4GiB)")
    parser.add_argument("--max-index-memory", default="4GB", help="build_index --max-index-memory (default 4GB)")
    parser.add_argument("--index", default="auto", help="build_index --index (default auto)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    parser.add_argument("--workdir", default="/tmp/clip-index-bench", help="features and index go here")
    parser.add_argument("--fresh", action="store_true", help="write the features again")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs (default: all)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data

def make_features(args) -> tuple[Path, np.ndarray]:
    workdir = Path(args.workdir)
    features = workdir / f"features-{args.rows}"
    marker = features / "_complete.json"
    data = ClusteredEmbeddings(seed=0)
    queries = data.sample(args.queries)  # drawn first: the same queries whatever the corpus size
    if args.fresh or not marker.is_file():
        shutil.rmtree(features, ignore_errors=True)
        start = time.perf_counter()
        write_shards(features, lambda first, rows: data.sample(rows), args.rows, SHARD_ROWS)
        marker.write_text(json.dumps({"rows": args.rows}))
        print(f"features: {args.rows} x {DIM} written in {time.perf_counter() - start:.0f} s")
    size = sum(f.stat().st_size for f in features.glob("*.parquet"))
    print(f"features: {features} ({size / 2**30:.2f} GiB of Parquet, {args.rows * DIM * 4 / 2**30:.2f} GiB "
          f"as float32)")
    return features, queries


def exact_truth(features: Path, queries: np.ndarray) -> np.ndarray:
    best = None
    for block in iter_feature_blocks(features, SHARD_ROWS):
        found = exact_topk(queries, block.vectors, block.ids, K)
        best = found if best is None else merge_topk([best, found], K)
    return best[1]


# ---------------------------------------------------------------- memory

class MemoryWatch:
    """Peaks of the job's memory: its cgroup's (when one could be made) and psutil's sum of RSS."""

    def __init__(self, limit: int):
        self.home = next((CGROUP / line.split(":", 2)[2].lstrip("/") for line in open("/proc/self/cgroup")
                          if line.split(":")[1] == "memory"), CGROUP)
        self.cgroup = self._enter_cgroup(limit)
        self.peak_held = self.peak_resident = self.peak_rss_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _enter_cgroup(limit: int) -> Path | None:
        group = CGROUP / f"clip-index-bench-{os.getpid()}"
        try:
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit))
            try:
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no escape into swap
            except OSError:
                pass
            (group / "cgroup.procs").write_text(str(os.getpid()))  # Ray's processes are started from here
            return group
        except OSError as exc:
            print(f"no memory cgroup ({exc}): memory is psutil's sum of RSS only, and not limited")
            return None

    def _stat(self) -> dict[str, int]:
        lines = (self.cgroup / "memory.stat").read_text().split("\n")
        return {k: int(v) for k, v in (line.split() for line in lines if line)}

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.2):
            if self.cgroup is not None:
                stat = self._stat()
                held = stat.get("total_rss", 0) + stat.get("total_shmem", 0)
                self.peak_held = max(self.peak_held, held)
                self.peak_resident = max(self.peak_resident, held + stat.get("total_mapped_file", 0))
            total = 0
            for proc in [me] + me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss_sum = max(self.peak_rss_sum, total)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        out = {"rss_sum_peak_gib": self.peak_rss_sum / 2**30}
        if self.cgroup is not None:
            out["cgroup_held_peak_gib"] = self.peak_held / 2**30  # anonymous + shared memory (object store)
            out["cgroup_resident_peak_gib"] = self.peak_resident / 2**30  # + mapped files (reclaimable)
            out["cgroup_usage_peak_gib"] = int((self.cgroup / "memory.max_usage_in_bytes").read_text()) / 2**30
            out["cgroup_limit_hits"] = int((self.cgroup / "memory.failcnt").read_text())
            oom = dict(line.split() for line in (self.cgroup / "memory.oom_control").read_text().splitlines())
            out["oom_kills"] = int(oom.get("oom_kill", 0))
            try:  # back home, and the group goes once Ray's processes have left it
                (self.home / "cgroup.procs").write_text(str(os.getpid()))
            except OSError:
                pass
            for _ in range(30):
                try:
                    self.cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(1)
        return out


# ---------------------------------------------------------------- search

def search_latencies(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    faiss.omp_set_num_threads(1)
    index.search(queries[:10], K)  # page the coarse quantizer in
    ids, seconds = [], []
    for query in queries:
        start = time.perf_counter()
        ids.append(index.search(query[None], K)[1][0])
        seconds.append(time.perf_counter() - start)
    return np.asarray(ids), np.asarray(seconds)


def exact_seconds_per_query(features: Path, queries: np.ndarray) -> float:
    """One thread, brute force over every shard, per query (timed on 20 queries)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        exact_truth(features, queries[:20])
        return (time.perf_counter() - start) / 20
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # the build's steps
    features, queries = make_features(args)
    output = Path(args.workdir) / f"index-{args.rows}"
    shutil.rmtree(output, ignore_errors=True)

    import ray

    watch = MemoryWatch(parse_bytes(args.memory_limit))
    ray.init(num_cpus=args.cpus, object_store_memory=256 * 2**20, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    start = time.perf_counter()
    report = build_index(IndexConfig((str(features),), str(output), index=args.index,
                                     max_index_memory=args.max_index_memory))
    build_seconds = time.perf_counter() - start
    ray.shutdown()
    memory = watch.stop()
    files = {p.name: p.stat().st_size for p in output.iterdir() if p.is_file()}
    index_bytes = report.index_bytes
    print(f"build: {report.factory} over {report.count} x {report.dim} in {build_seconds:.0f} s on {args.cpus} CPUs "
          f"= {report.count / build_seconds / args.cpus:.0f} vectors/s per core; {report.num_shards} shard(s); "
          f"tuned {report.search_parameters}: recall@10 {report.recall:.4f} on {report.tune_queries} held-out "
          f"corpus vectors")
    print(f"memory (limit {args.memory_limit}): " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in memory.items()))
    vectors = sum(v for k, v in files.items() if k.startswith("vectors-"))
    table = sum(v for k, v in files.items() if k.startswith(("metadata", "ids", "positions")))
    print(f"disk: index {index_bytes / report.count:.1f} B/vector ({index_bytes / 2**30:.2f} GiB), float16 "
          f"vectors {vectors / report.count:.0f} B/vector, id table {table / report.count:.1f} B/vector")

    truth = exact_truth(features, queries)
    index = open_index(output)
    found, seconds = search_latencies(index, queries)
    recall = recall_at_k(found, truth)
    exact = exact_seconds_per_query(features, queries)
    p50, p99 = np.percentile(seconds, [50, 99]) * 1e3
    qps = 1 / seconds.mean()
    print(f"search, 1 thread, 1 query a call: {qps:.0f} QPS, p50 {p50:.2f} ms, p99 {p99:.2f} ms; exact: "
          f"{1 / exact:.2f} QPS -> {qps * exact:.0f}x")
    verdict = "met" if recall >= TARGET_RECALL else f"MISSED by {TARGET_RECALL - recall:.4f}"
    print(f"recall@10 on {len(queries)} held-out queries (not in the corpus): {recall:.4f} "
          f"(target {TARGET_RECALL}: {verdict})")
    print(json.dumps({"rows": report.count, "factory": report.factory, "build_seconds": round(build_seconds, 1),
                      "cpus": args.cpus, "vectors_per_s_per_core": round(report.count / build_seconds / args.cpus),
                      "index_bytes_per_vector": round(index_bytes / report.count, 2),
                      "vector_store_bytes_per_vector": round(vectors / report.count, 1),
                      "id_table_bytes_per_vector": round(table / report.count, 2), "recall_at_10": round(recall, 4),
                      "tuned": report.search_parameters, "qps_1_thread": round(qps, 1), "p50_ms": round(p50, 3),
                      "p99_ms": round(p99, 3), "exact_qps_1_thread": round(1 / exact, 3), **memory}))


if __name__ == "__main__":
    main()
