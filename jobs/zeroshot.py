"""Zero-shot image classification with cn_clip's zeroshot_evaluation.py flags and
its ELEVATER-style output (`<save-dir>/<dataset>.json`): class embeddings from a
Chinese prompt set, images encoded by an actor pool over Ray Data, top-1/top-5.

    ray job submit --working-dir . -- python jobs/zeroshot.py \
        --datapath datasets/cifar-100/test --label-file datasets/cifar-100/label_cn.txt \
        --dataset cifar-100 --resume pretrained_weights/clip_cn_vit-b-16.pt --save-dir results

`--resume` takes anything clip_models.load accepts (cn_clip .pt, Hugging Face
directory, this project's checkpoint); the model flags may then be omitted.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.batch.precision import PRECISIONS
from clip_platform.batch.zeroshot import ZeroShotConfig, zeroshot


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datapath", required=True, help="test folder: <label id>/<images>")
    parser.add_argument("--label-file", required=True, help="label_cn.txt, one class name per line")
    parser.add_argument("--dataset", default="imagenet", help="dataset name (output file name)")
    parser.add_argument("--save-dir", default=".", help="directory of the output JSON")
    parser.add_argument("--resume", default=None, help="checkpoint to evaluate")
    parser.add_argument("--vision-model", default=None, help="model name in the JSON; a released name loads it")
    parser.add_argument("--text-model", default=None, help="accepted for cn_clip compatibility")
    parser.add_argument("--precision", choices=PRECISIONS, default="amp", help="amp/fp32 (fp32), bf16 or fp16")
    parser.add_argument("--img-batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--context-length", type=int, default=52, help="prompt token limit")
    parser.add_argument("--num-workers", type=int, default=4, help="image decode tasks in flight")
    parser.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per encoder actor")
    parser.add_argument("--index", default="", help="JSON list of positions reordering the outputs")
    parser.add_argument("--templates", default="", help="prompt template file, one per line with {}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    result = zeroshot(config.build(ZeroShotConfig, vars(parse_args(argv))))
    print(f"zeroshot-top1: {result.top1}, zeroshot-top5: {result.top5}")
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "skipped"} | {"skipped": len(result.skipped)}))


if __name__ == "__main__":
    cli.run(main)
