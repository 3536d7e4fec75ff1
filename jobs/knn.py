"""Top-k retrieval predictions from image and text features, with the flags and
output of cn_clip's make_topk_predictions.py (text->image) and
make_topk_predictions_tr.py (`--mode i2t`): exact search sharded over the
cluster (ids identical to brute force, ties broken by id), `--index faiss`
for corpora too big for exact search (its recall against exact is reported),
or `--index DIR` to search an index built by jobs/build_index.py (then only the
query features are given: --text-feats for t2i, --image-feats for i2t).

    ray job submit --working-dir . -- python jobs/knn.py \
        --image-feats test_imgs.img_feat.jsonl --text-feats test_texts.txt_feat.jsonl \
        --top-k 10 --output test_predictions.jsonl [--mode i2t] [--index faiss]
    ray job submit --working-dir . -- python jobs/knn.py \
        --text-feats test_texts.txt_feat.jsonl --index indexes/test_images --output test_predictions.jsonl

Features may be cn_clip's JSONL files, Parquet files, or directories of Parquet
shards (`id`, `feature`), as jobs/embed.py writes them.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.batch.knn import KnnConfig, knn_search


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(KnnConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    report = knn_search(config.from_args(KnnConfig, args))
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    cli.run(main)
