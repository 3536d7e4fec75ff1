"""KNN benchmark: the sharded exact top-k of jobs/knn.py against cn_clip's approach,
and the FAISS index against exact search. Ratios are measured in one run.

    python benchmarks/knn.py            # exact: 10k queries x 200k; FAISS: 10k x 1M (~6 min on 2 cores)
    python benchmarks/knn.py --small    # the same at a tenth of the size (~1 min)

Exact part: normalised Gaussian 512-d features. The baseline is
make_topk_predictions.py's loop (one query at a time: score every candidate, build
(id, score) tuples, sort in Python), on CPU like ours, timed on a sample of
queries and reported per query; its features are given to it in memory, so its
JSONL parsing is not counted against it. Ours is the whole job: shards into the
object store, Ray tasks, predictions file written.

FAISS part: real CLIP features cannot be downloaded here, so the corpus is
synthetic with the structure that matters to an approximate index: 512-d points
near a 32-d manifold of 2000 clusters, normalised (top-1 cosine ~0.87, random
pairs ~0), queries drawn the same way. Uniform random vectors would be the
worst case for any index and unlike real embeddings.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from clip_platform.data.features import Features, write_features_parquet
from clip_platform.batch.knn import KnnConfig, knn_search

DIM = 512
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 10.0  # FAISS against exact search


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a tenth of the sizes, for a quick run")
    parser.add_argument("--baseline-queries", type=int, default=0, help="queries timed for cn_clip's loop")
    parser.add_argument("--skip-exact", action="store_true", help="only the FAISS benchmark")
    parser.add_argument("--skip-faiss", action="store_true", help="only the exact benchmark")
    parser.add_argument("--workdir", default=None, help="where feature shards go (default: a temp dir)")
    args = parser.parse_args(argv)
    scale = 10 if args.small else 1
    args.queries, args.corpus = 10_000 // scale, 200_000 // scale
    args.faiss_queries, args.faiss_corpus = 10_000 // scale, 1_000_000 // scale
    args.baseline_queries = args.baseline_queries or (50 if args.small else 200)
    return args


# ---------------------------------------------------------------- data

def random_unit(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.standard_normal((rows, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class ClusteredEmbeddings:
    """Unit vectors near a low-dimensional manifold with clusters, like CLIP features."""

    def __init__(self, seed: int = 0, intrinsic_dim: int = 32, num_clusters: int = 2000):
        self.rng = np.random.default_rng(seed)
        self.centers = self.rng.standard_normal((num_clusters, intrinsic_dim), dtype=np.float32)
        self.lift = self.rng.standard_normal((intrinsic_dim, DIM), dtype=np.float32)

    def sample(self, rows: int) -> np.ndarray:
        z = self.centers[self.rng.integers(0, len(self.centers), rows)]
        z = z + 0.6 * self.rng.standard_normal(z.shape, dtype=np.float32)
        x = z @ self.lift + 0.5 * self.rng.standard_normal((rows, DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shards(directory: Path, make_rows, num_rows: int, shard_rows: int = 100_000) -> Path:
    """Parquet shards of `num_rows` features with ids 0..num_rows-1; `make_rows(start, rows)` gives the vectors."""
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, num_rows, shard_rows):
        rows = min(shard_rows, num_rows - start)
        ids = np.arange(start, start + rows, dtype=np.int64)
        write_features_parquet(directory / f"part-{start // shard_rows:05d}.parquet",
                               Features(ids, make_rows(start, rows)))
    return directory


def read_predictions(path: str, key: str) -> dict[int, list[int]]:
    with open(path, encoding="utf-8") as lines:
        return {obj["text_id"]: obj[key] for obj in map(json.loads, lines)}


# ---------------------------------------------------------------- cn_clip's approach

def cn_clip_topk(text_feats: list, image_ids: list, image_feats_array: np.ndarray, top_k: int = 10,
                 eval_batch_size: int = 32768) -> list[list[int]]:
    """make_topk_predictions.py's search loop, verbatim but on CPU (.cuda() dropped)."""
    results = []
    for text_feat in text_feats:
        score_tuples = []
        text_feat_tensor = torch.tensor([text_feat], dtype=torch.float)
        idx = 0
        while idx < len(image_ids):
            img_feats_tensor = torch.from_numpy(image_feats_array[idx: min(idx + eval_batch_size, len(image_ids))])
            batch_scores = text_feat_tensor @ img_feats_tensor.t()
            for image_id, score in zip(image_ids[idx: min(idx + eval_batch_size, len(image_ids))],
                                       batch_scores.squeeze(0).tolist()):
                score_tuples.append((image_id, score))
            idx += eval_batch_size
        top_k_predictions = sorted(score_tuples, key=lambda x: x[1], reverse=True)[:top_k]
        results.append([entry[0] for entry in top_k_predictions])
    return results


# ---------------------------------------------------------------- the two benchmarks

def bench_exact(args, workdir: Path) -> None:
    print(f"== exact top-10: {args.queries} queries x {args.corpus} x {DIM}")
    rng = np.random.default_rng(0)
    corpus = random_unit(rng, args.corpus)
    queries = random_unit(rng, args.queries)
    images = write_shards(workdir / "exact_images", lambda start, rows: corpus[start:start + rows], args.corpus)
    texts = write_shards(workdir / "exact_texts", lambda start, rows: queries[start:start + rows], args.queries)
    output = str(workdir / "exact_pred.jsonl")

    report = knn_search(KnnConfig(str(images), str(texts), output))
    ours_rate = report.num_queries / report.seconds
    print(f"ours (jobs/knn.py, exact, whole job): {report.seconds:.1f} s = {ours_rate:.0f} queries/s "
          f"(load {report.load_seconds:.1f} s, search+write {report.search_seconds:.1f} s)")

    sample = args.baseline_queries
    start = time.perf_counter()
    baseline = cn_clip_topk(queries[:sample].tolist(), list(range(args.corpus)), corpus)
    base_seconds = time.perf_counter() - start
    base_rate = sample / base_seconds
    print(f"cn_clip approach: {base_seconds:.1f} s for {sample} queries = {base_rate:.1f} queries/s "
          f"(~{args.queries / base_rate:.0f} s for all {args.queries})")

    ours = read_predictions(output, "image_ids")
    same = sum(ours[i] == baseline[i] for i in range(sample))
    print(f"exact speed-up vs cn_clip: {ours_rate / base_rate:.1f}x; identical ids on {same}/{sample} "
          f"compared queries: {same == sample}")


def bench_faiss(args, workdir: Path) -> None:
    print(f"== FAISS vs exact: {args.faiss_queries} queries x {args.faiss_corpus} x {DIM} (clustered synthetic)")
    data = ClusteredEmbeddings(seed=1)
    images = write_shards(workdir / "faiss_images", lambda _, rows: data.sample(rows), args.faiss_corpus)
    texts = write_shards(workdir / "faiss_texts", lambda _, rows: data.sample(rows), args.faiss_queries)

    exact = knn_search(KnnConfig(str(images), str(texts), str(workdir / "exact.jsonl")))
    print(f"exact: search {exact.search_seconds:.1f} s (whole job {exact.seconds:.1f} s)")
    approx = knn_search(KnnConfig(str(images), str(texts), str(workdir / "faiss.jsonl"), index="faiss"))
    print(f"{approx.index}: build {approx.build_seconds:.1f} s, search {approx.search_seconds:.1f} s; "
          f"job's sampled recall@10 {approx.recall:.4f} on {approx.recall_queries} queries; whole job "
          f"{approx.seconds:.1f} s (exact's {exact.seconds:.1f} s)")

    truth = read_predictions(str(workdir / "exact.jsonl"), "image_ids")
    found = read_predictions(str(workdir / "faiss.jsonl"), "image_ids")
    recall = np.mean([len(set(found[q]) & set(truth[q])) / len(truth[q]) for q in truth])
    print(f"FAISS recall@10 vs exact over all {len(truth)} queries: {recall:.4f}")
    search_only = exact.search_seconds / approx.search_seconds
    with_build = exact.search_seconds / (approx.build_seconds + approx.search_seconds)
    print(f"FAISS speed vs exact: search {search_only:.1f}x; build + search {with_build:.1f}x")
    for name, ratio in (("search only", search_only), ("build + search", with_build)):
        verdict = "met" if recall >= TARGET_RECALL and ratio >= TARGET_SPEEDUP else "MISSED"
        print(f"target (recall@10 >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x exact), {name}: "
              f"recall {recall:.4f} at {ratio:.1f}x: {verdict}")


def main(argv=None) -> None:
    args = parse_args(argv)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if not args.skip_exact:
            bench_exact(args, Path(tmp))
        if not args.skip_faiss:
            bench_faiss(args, Path(tmp))
    ray.shutdown()


if __name__ == "__main__":
    main()
