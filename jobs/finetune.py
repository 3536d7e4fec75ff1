"""Finetune Chinese-CLIP on Ray Train workers with DeepSpeed (or DDP).

Takes the flags of cn_clip's training/main.py, or a YAML recipe, plus Ray options:

    python jobs/finetune.py --config configs/demo.yaml                # embedded local Ray
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python jobs/finetune.py --config configs/muge_finetune.yaml --workers 8 --use-gpu

cn_clip-style: --train-data D/lmdb/train --val-data D/lmdb/valid --vision-model ViT-B-16
--text-model RoBERTa-wwm-ext-base-chinese --batch-size 128 --lr 5e-5 --max-epochs 3 ...
"""
from __future__ import annotations

import argparse

from clip_platform import cli, config


def main(argv=None) -> None:
    from clip_platform.train import TrainConfig, run_finetune

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (its `finetune:` section, or the whole file); flags override it")
    config.add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    recipe = config.load_yaml(args.config) if args.config else {}
    recipe = recipe.get("finetune", recipe)
    result = run_finetune(config.build(TrainConfig, recipe, config.overrides(args, TrainConfig)))
    print(f"checkpoint: {result.checkpoint}\nlogs and curves: {result.run_dir}")
    for key in ("valid_t2i_r1", "valid_i2t_r1", "valid_mean_recall"):
        if key in result.final_metrics:
            print(f"{key}: {result.final_metrics[key]:.2f}")


if __name__ == "__main__":
    cli.run(main)
