"""Training throughput of jobs/finetune.py on this machine: samples/s for 1 vs 2 Ray
Train workers and DeepSpeed (ZeRO-2) vs DDP, on the tiny model and on ViT-B-16.
Ratios are against 1 worker + DDP of the same model, measured in the same run.

    python benchmarks/train.py [--models tiny,vit-b-16] [--steps 6]

Throughput is the median over steps after the first two (warm-up), from the run's
metrics.jsonl (global batch / step wall time, data loading included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

MODELS = {
    "tiny": dict(vision_model="ViT-Tiny", text_model="BERT-Tiny-chinese", batch_size=32),
    "vit-b-16": dict(vision_model="ViT-B-16", text_model="RoBERTa-wwm-ext-base-chinese", batch_size=8),
}
SETUPS = [(1, "ddp"), (1, "deepspeed"), (2, "ddp"), (2, "deepspeed")]


def throughput(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][2:]
    return statistics.median(rates)


def main() -> None:
    import ray

    from clip_platform.data import SyntheticConfig, make_synthetic
    from clip_platform.train import TrainConfig, run_finetune

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,vit-b-16")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 cores; logical CPUs for decode tasks
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(SyntheticConfig(f"{tmp}/data", num_train=256, num_valid=1, num_test=1, resolution=64,
                                       lmdb=True, zeroshot_per_class=0))
        print(f"{'model':<10}{'workers':>8}{'backend':>11}{'samples/s':>11}{'ratio':>8}")
        for model in args.models.split(","):
            baseline = None
            for workers, backend in SETUPS:
                config = TrainConfig(train_data=f"{tmp}/data/lmdb/train", logs=f"{tmp}/logs",
                                     name=f"{model}-{workers}-{backend}", workers=workers, backend=backend,
                                     cpus_per_worker=1, max_steps=args.steps, precision="fp32", warmup=1,
                                     num_workers=1, max_failures=0, log_interval=10**6, **MODELS[model])
                rate = throughput(run_finetune(config).run_dir)
                baseline = baseline or rate
                print(f"{model:<10}{workers:>8}{backend:>11}{rate:>11.2f}{rate / baseline:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
