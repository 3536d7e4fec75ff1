"""Training throughput and memory of jobs/finetune.py on this machine, on the tiny model and
on ViT-B-16:

* scaling: samples/s for 1 vs 2 Ray Train workers and DeepSpeed (ZeRO-2) vs DDP; ratios
  against 1 worker + DDP of the same model, measured in the same run;
* tuning: what a full finetune costs against --freeze-text, --unfrozen-vision-layers 2 with
  the text tower frozen, and LoRA (--lora-rank 8 on the default targets), 1 worker + DeepSpeed
  ZeRO-2; ratios against the full finetune of the same model, measured in the same run.

    python benchmarks/train.py [--models tiny,vit-b-16] [--rows scaling,tuning] [--steps 6]

Throughput is the median over steps after the first two (warm-up), from the run's
metrics.jsonl (global batch / step wall time, data loading included). Memory is the peak,
sampled every 0.1 s, of the summed RSS of the run's Ray Train worker processes (the weights,
gradients, optimizer state and activations; the decode tasks and Ray's own processes are the
same for every row and left out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

MODELS = {
    "tiny": dict(vision_model="ViT-Tiny", text_model="BERT-Tiny-chinese", batch_size=32),
    "vit-b-16": dict(vision_model="ViT-B-16", text_model="RoBERTa-wwm-ext-base-chinese", batch_size=8),
}
SCALING = [("1 worker ddp", dict(workers=1, backend="ddp")), ("1 worker zero2", dict(workers=1)),
           ("2 workers ddp", dict(workers=2, backend="ddp")), ("2 workers zero2", dict(workers=2))]
TUNING = [("full finetune", {}), ("freeze text", dict(freeze_text=True)),
          ("last 2 vision blocks", dict(freeze_text=True, unfrozen_vision_layers=2)),
          ("lora r8", dict(lora_rank=8))]


def throughput(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][2:]
    return statistics.median(rates)


class PeakSampler:
    """The peak of `read()`, sampled every `interval` seconds in a thread while the block runs."""

    def __init__(self, read: Callable[[], int], interval: float = 0.1):
        self.read, self.interval, self.peak = read, interval, 0

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def train_worker_rss() -> int:
    """Summed RSS of Ray Train's worker processes."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "TrainWorker" in " ".join(proc.info["cmdline"] or ()):
                total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    import ray

    from clip_platform.data import SyntheticConfig, make_synthetic
    from clip_platform.train import TrainConfig, run_finetune

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,vit-b-16")
    parser.add_argument("--rows", default="scaling,tuning")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 cores; logical CPUs for decode tasks
    setups = {"scaling": SCALING, "tuning": TUNING}
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(SyntheticConfig(f"{tmp}/data", num_train=256, num_valid=1, num_test=1, resolution=64,
                                       lmdb=True, zeroshot_per_class=0))
        print(f"{'model':<10}{'setup':>22}{'samples/s':>11}{'ratio':>8}{'workers MiB':>13}{'ratio':>8}")
        for model in args.models.split(","):
            for rows in args.rows.split(","):
                baseline = None
                for name, flags in setups[rows]:
                    config = TrainConfig(train_data=f"{tmp}/data/lmdb/train", logs=f"{tmp}/logs",
                                         name=f"{model}-{name.replace(' ', '-')}", cpus_per_worker=1,
                                         max_steps=args.steps, precision="fp32", warmup=1, num_workers=1,
                                         max_failures=0, log_interval=10**6, **{**MODELS[model], **flags})
                    with PeakSampler(train_worker_rss) as memory:
                        rate = throughput(run_finetune(config).run_dir)
                    mib = memory.peak / 2**20
                    baseline = baseline or (rate, mib)
                    print(f"{model:<10}{name:>22}{rate:>11.2f}{rate / baseline[0]:>7.2f}x{mib:>13.0f}"
                          f"{mib / baseline[1]:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
