"""Image and text features of a corpus, with the flags and output of cn_clip's
extract_features.py: Ray Data reads and decodes the corpus, an actor pool holding
the model encodes it (GPUs when present), shards are written as they finish, and a
re-run after an interruption skips the finished ones.

    ray job submit --working-dir . -- python jobs/embed.py \
        --extract-image-feats --extract-text-feats \
        --image-data datasets/MUGE/lmdb/valid/imgs --text-data datasets/MUGE/valid_texts.jsonl \
        --resume pretrained_weights/clip_cn_vit-b-16.pt [--precision bf16] \
        [--output-dir features/valid --format parquet] [--backend auto|torch|onnxruntime|openvino]

Without --output-dir the features go to cn_clip's JSONL files (default paths next
to --text-data, as cn_clip). With it, each modality is a folder of Parquet (or
JSONL) shards that jobs/knn.py reads directly. `--resume` takes anything
clip_models.load accepts; the model flags may then be omitted. --backend onnxruntime or
openvino encodes with the checkpoint's ONNX graphs (exported once per node); auto picks the
fastest path for the device (OpenVINO on CPUs).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.batch.embed import EmbedConfig, embed


def main(argv: Sequence[str] | None = None) -> None:
    parser = config.parser(EmbedConfig, __doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", default=False, help="log more")
    args = parser.parse_args(argv)
    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    embed_config = config.from_args(EmbedConfig, args)
    config.check_model(embed_config.model_source, embed_config.context_length)
    for report in embed(embed_config):
        print(json.dumps(asdict(report), ensure_ascii=False))


if __name__ == "__main__":
    cli.run(main)
