"""Zero-shot image classification with cn_clip's zeroshot_evaluation.py flags and
its ELEVATER-style output (`<save-dir>/<dataset>.json`): class embeddings from a
Chinese prompt set, images encoded by an actor pool over Ray Data, top-1/top-5.

    ray job submit --working-dir . -- python jobs/zeroshot.py \
        --datapath datasets/cifar-100/test --label-file datasets/cifar-100/label_cn.txt \
        --dataset cifar-100 --resume pretrained_weights/clip_cn_vit-b-16.pt --save-dir results \
        [--backend auto|torch|onnxruntime|openvino]

`--resume` takes anything clip_models.load accepts (cn_clip .pt, Hugging Face
directory, this project's checkpoint); the model flags may then be omitted.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.batch.zeroshot import ZeroShotConfig, zeroshot


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(ZeroShotConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    zeroshot_config = config.from_args(ZeroShotConfig, args)
    config.check_model(zeroshot_config.resume or zeroshot_config.vision_model, zeroshot_config.context_length)
    result = zeroshot(zeroshot_config)
    print(f"zeroshot-top1: {result.top1}, zeroshot-top5: {result.top5}")
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "skipped"} | {"skipped": len(result.skipped)}))


if __name__ == "__main__":
    cli.run(main)
