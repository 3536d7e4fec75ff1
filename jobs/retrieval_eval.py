"""Retrieval evaluation of a dataset split in one command: embed images and texts,
top-10 retrieval both ways (text->image and image->text), cn_clip's recall, and a
summary table of R@1/5/10 and mean recall (also written as <output-dir>/summary.json).

    ray job submit --working-dir . -- python jobs/retrieval_eval.py \
        --data-dir datasets/MUGE --split valid \
        --resume experiments/muge_finetune/checkpoints/epoch_latest.pt --output-dir eval/muge_valid

The split's images are read from <data-dir>/lmdb/<split>/imgs when built, else
<data-dir>/<split>_imgs.tsv; texts and ground truth from <data-dir>/<split>_texts.jsonl.
A re-run resumes the feature shards of an interrupted one.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.batch.precision import PRECISIONS
from clip_platform.batch.retrieval import RetrievalEvalConfig, format_table, retrieval_eval


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="", help="dataset folder ({split}_texts.jsonl, images)")
    parser.add_argument("--split", default="valid", help="split to evaluate (default valid)")
    parser.add_argument("--output-dir", required=True, help="folder for features, predictions and scores")
    parser.add_argument("--resume", default=None, help="checkpoint: cn_clip .pt, Hugging Face dir or ours")
    parser.add_argument("--vision-model", default=None, help="released model to load when --resume is not given")
    parser.add_argument("--image-data", default=None, help="images instead of the split's")
    parser.add_argument("--text-data", default=None, help="texts JSONL instead of the split's")
    parser.add_argument("--precision", choices=PRECISIONS, default="amp", help="amp/fp32 (fp32), bf16 or fp16")
    parser.add_argument("--img-batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--text-batch-size", type=int, default=64, help="texts per batch")
    parser.add_argument("--context-length", type=int, default=52, help="token limit per text")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per encoder actor (default: 1 if any)")
    parser.add_argument("--concurrency", type=int, default=0, help="encoder actors (0: automatic)")
    parser.add_argument("--rows-per-shard", type=int, default=10000, help="records per feature shard")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    summary = retrieval_eval(config.build(RetrievalEvalConfig, vars(parse_args(argv))))
    print(format_table(summary))
    print(json.dumps({k: summary[k] for k in ("t2i", "i2t", "mean_recall")}))


if __name__ == "__main__":
    cli.run(main)
