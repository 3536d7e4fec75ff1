"""Top-k retrieval predictions from image and text features, with the flags and
output of cn_clip's make_topk_predictions.py (text->image) and
make_topk_predictions_tr.py (`--mode i2t`): exact search sharded over the
cluster (ids identical to brute force, ties broken by id), or `--index faiss`
for corpora too big for exact search (its recall against exact is reported).

    ray job submit --working-dir . -- python jobs/knn.py \
        --image-feats test_imgs.img_feat.jsonl --text-feats test_texts.txt_feat.jsonl \
        --top-k 10 --output test_predictions.jsonl [--mode i2t] [--index faiss]

Features may be cn_clip's JSONL files, Parquet files, or directories of Parquet
shards (`id`, `feature`), as jobs/embed.py writes them.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.batch.knn import INDEXES, KnnConfig, knn_search
from clip_platform.batch.predictions import MODES


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-feats", required=True, help="image features: JSONL, Parquet file or shard directory")
    parser.add_argument("--text-feats", required=True, help="text features: JSONL, Parquet file or shard directory")
    parser.add_argument("--output", required=True, help="predictions JSONL to write")
    parser.add_argument("--top-k", type=int, default=10, help="ids predicted per query (default 10)")
    parser.add_argument("--eval-batch-size", type=int, default=32768,
                        help="corpus rows scored per matrix product inside a task (default 32768)")
    parser.add_argument("--mode", choices=MODES, default="t2i", help="t2i: texts query images; i2t: the reverse")
    parser.add_argument("--index", choices=INDEXES, default="exact", help="exact search, or an approximate FAISS index")
    parser.add_argument("--query-block-size", type=int, default=4096, help="queries per Ray task")
    parser.add_argument("--corpus-shard-size", type=int, default=131072, help="corpus rows per shard")
    parser.add_argument("--max-inflight-blocks", type=int, default=4, help="query blocks searched at once")
    parser.add_argument("--faiss-index", default="auto",
                        help="auto (by corpus size), flat, hnsw, ivf, or a faiss index_factory string")
    parser.add_argument("--nprobe", type=int, default=0, help="IVF lists visited per query (0: by corpus size)")
    parser.add_argument("--ef-search", type=int, default=0, help="HNSW search list size (0: from --top-k)")
    parser.add_argument("--faiss-cpus", type=int, default=0,
                        help="CPUs for building and searching the index (0: all of the largest node)")
    parser.add_argument("--recall-sample", type=int, default=1000,
                        help="queries re-searched exactly to report FAISS recall (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the FAISS training and recall samples")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    report = knn_search(config.build(KnnConfig, vars(parse_args(argv))))
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    cli.run(main)
