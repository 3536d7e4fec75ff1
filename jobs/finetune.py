"""Finetune Chinese-CLIP on Ray Train workers with DeepSpeed (or DDP).

Takes the flags of cn_clip's training/main.py, or a YAML recipe, plus Ray options:

    python jobs/finetune.py --config configs/demo.yaml                # embedded local Ray
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \\
        python jobs/finetune.py --config configs/muge_finetune.yaml --workers 8 --use-gpu

cn_clip-style: --train-data D/lmdb/train --val-data D/lmdb/valid --vision-model ViT-B-16
--text-model RoBERTa-wwm-ext-base-chinese --batch-size 128 --lr 5e-5 --max-epochs 3 ...
"""
from __future__ import annotations

from pathlib import Path

from clip_platform import cli, config


def make_demo_data(recipe: dict) -> None:
    """A demo recipe (one with a `synthetic:` section) brings its own data: under `ray job
    submit --working-dir .` the job runs in an uploaded copy of the code, without demo_output/."""
    from clip_platform.demo import DemoConfig, make_data

    make_data(config.build(DemoConfig, recipe))


def main(argv=None) -> None:
    from clip_platform.train import TrainConfig, run_finetune

    parser = config.parser(TrainConfig, __doc__)
    parser.add_argument("--config", default=None,
                        help="YAML recipe (its `finetune:` section, or the whole file); flags override it")
    args = parser.parse_args(argv)
    whole = config.load_yaml(args.config) if args.config else {}
    train_config = config.from_args(TrainConfig, args, whole.get("finetune", whole), source=args.config)
    config.check_model(train_config.resume, fits=train_config.model_config())
    if "synthetic" in whole and not Path(train_config.train_data).exists():
        make_demo_data(whole)
    result = run_finetune(train_config)
    print(f"checkpoint: {result.checkpoint}\nlogs and curves: {result.run_dir}")
    for key in ("valid_t2i_r1", "valid_i2t_r1", "valid_mean_recall"):
        if key in result.final_metrics:
            print(f"{key}: {result.final_metrics[key]:.2f}")


if __name__ == "__main__":
    cli.run(main)
