"""Build a persistent, memory-mapped retrieval index over feature shards, on the cluster
and in bounded memory: the index chosen from the corpus size and --max-index-memory (or
named), trained on a streamed sample, filled by parallel tasks and merged onto disk, its
search parameters tuned to --recall-target; an interrupted build resumes.

    ray job submit --working-dir . -- python jobs/build_index.py \
        --features features/corpus/images --output indexes/corpus [--max-index-memory 4GB] \
        [--index auto|flat|hnsw|ivf|fast|FACTORY] [--num-shards N] [--recall-target 0.95]
    python jobs/build_index.py --output indexes/corpus --add --features features/more/images
    python jobs/build_index.py --output indexes/corpus --remove-ids takedown.txt   # one id a line

Features: folders of the embed job's Parquet shards, globs, Parquet files or cn_clip's
feature JSONL. Search it with clip_platform.index.open_index(DIR).search(queries, k).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.index import IndexConfig
from clip_platform.index.build import build_index
from clip_platform.index.update import add_features, remove_ids


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(IndexConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    index_config = config.from_args(IndexConfig, args)
    job = remove_ids if index_config.remove_ids else add_features if index_config.add else build_index
    report = job(index_config)
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    cli.run(main)
