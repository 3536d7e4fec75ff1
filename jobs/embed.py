"""Image and text features of a corpus, with the flags and output of cn_clip's
extract_features.py: Ray Data reads and decodes the corpus, an actor pool holding
the model encodes it (GPUs when present), shards are written as they finish, and a
re-run after an interruption skips the finished ones.

    ray job submit --working-dir . -- python jobs/embed.py \
        --extract-image-feats --extract-text-feats \
        --image-data datasets/MUGE/lmdb/valid/imgs --text-data datasets/MUGE/valid_texts.jsonl \
        --resume pretrained_weights/clip_cn_vit-b-16.pt [--precision bf16] \
        [--output-dir features/valid --format parquet]

Without --output-dir the features go to cn_clip's JSONL files (default paths next
to --text-data, as cn_clip). With it, each modality is a folder of Parquet (or
JSONL) shards that jobs/knn.py reads directly. `--resume` takes anything
clip_models.load accepts; the model flags may then be omitted.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.batch.embed import COMPILE_CHOICES, COMPILE_MIN_IMAGES, DEFAULT_IMAGE_DATA, DEFAULT_TEXT_DATA, \
    EmbedConfig, embed
from clip_platform.batch.embed_store import FORMATS
from clip_platform.batch.precision import PRECISIONS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extract-image-feats", action="store_true", help="embed the images of --image-data")
    parser.add_argument("--extract-text-feats", action="store_true", help="embed the texts of --text-data")
    parser.add_argument("--image-data", default=DEFAULT_IMAGE_DATA,
                        help="LMDB imgs dir, *_imgs.tsv, Parquet (id, image) or image files / folder")
    parser.add_argument("--text-data", default=DEFAULT_TEXT_DATA, help="texts JSONL")
    parser.add_argument("--image-feat-output-path", default=None,
                        help="image features JSONL (default: <text-data stem>_imgs.img_feat.jsonl)")
    parser.add_argument("--text-feat-output-path", default=None,
                        help="text features JSONL (default: <text-data stem>.txt_feat.jsonl)")
    parser.add_argument("--img-batch-size", type=int, default=64, help="images per batch (CPU encoders: at most 16)")
    parser.add_argument("--text-batch-size", type=int, default=64, help="texts per batch")
    parser.add_argument("--context-length", type=int, default=52, help="token limit per text")
    parser.add_argument("--resume", default=None, help="checkpoint: cn_clip .pt, Hugging Face dir or ours")
    parser.add_argument("--precision", choices=PRECISIONS, default="amp", help="amp/fp32 (fp32), bf16 or fp16")
    parser.add_argument("--vision-model", default=None, help="released model to load when --resume is not given")
    parser.add_argument("--text-model", default=None, help="accepted for cn_clip compatibility")
    parser.add_argument("--output-dir", default=None, help="write sharded output to <dir>/images and <dir>/texts")
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="shard format in --output-dir")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per encoder actor (default: 1 if any)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="encoder actors (0: one per GPU, or one per CPU node)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per CPU encoder actor (0: auto)")
    parser.add_argument("--rows-per-shard", type=int, default=10000, help="records per shard (resume unit)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another input or model")
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                        help="image encoders through torch.compile (auto: CPU encoders with "
                             f"{COMPILE_MIN_IMAGES}+ images each)")
    parser.add_argument("--debug", action="store_true", help="log more")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = vars(parse_args(argv))
    if args.pop("debug"):
        logging.getLogger().setLevel(logging.DEBUG)
    for report in embed(config.build(EmbedConfig, args)):
        print(json.dumps(asdict(report), ensure_ascii=False))


if __name__ == "__main__":
    cli.run(main)
