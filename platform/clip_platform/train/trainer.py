"""Driver side of finetuning: a Ray Train TorchTrainer over `train_loop_per_worker`,
then the run's summary and plot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import write_json
from .config import TrainConfig
from .data import DECODE_CPUS, count_pairs
from .loop import train_loop_per_worker
from .plan import Plan
from .plot import plot_run



@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path  # {logs}/{name}: logs, metrics.jsonl, plots, checkpoints/
    checkpoint: Path  # cn_clip-layout epoch_latest.pt (loadable by clip_models.load and cn_clip)
    ray_checkpoint: str | None  # the last Ray Train checkpoint directory
    final_metrics: dict  # the last validation (and step) metrics reported
    plot: Path | None  # loss / accuracy / recall curves


def check_data(config: TrainConfig) -> None:
    """Fail fast, on the driver, with one clear line for data the run cannot use."""
    num_samples = count_pairs(config.train_data)
    Plan(num_samples, config.batch_size, config.workers, config.accum_freq, config.seed)  # raises if too small
    if config.val_data:
        count_pairs(config.val_data)


def check_resources(config: TrainConfig, resources: dict) -> None:
    """Decoding runs as Ray Data tasks beside the training workers: they need CPUs left over."""
    spare = resources.get("CPU", 0) - config.workers * config.cpus_per_worker
    if spare < DECODE_CPUS:
        raise ValueError(
            f"{config.workers} training workers x {config.cpus_per_worker} CPUs leave {spare:g} of the cluster's "
            f"{resources.get('CPU', 0):g} CPUs for data decoding; lower --cpus-per-worker or --workers, or add nodes")
    if config.use_gpu and resources.get("GPU", 0) < config.workers:
        raise ValueError(f"--use-gpu with {config.workers} workers needs {config.workers} GPUs; "
                         f"the cluster has {resources.get('GPU', 0):g}")


def run_finetune(config: TrainConfig) -> FinetuneResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_data(config)
    if not ray.is_initialized():
        ray.init()  # embedded local Ray, or the cluster of `ray job submit`
    check_resources(config, ray.cluster_resources())
    storage = config.storage_path or str(Path(config.logs) / "ray_results")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name=config.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    plot = plot_run(config.run_dir)
    summary = {"run_dir": str(config.run_dir), "checkpoint": str(config.checkpoint_dir / "epoch_latest.pt"),
               "ray_checkpoint": result.checkpoint.path if result.checkpoint else None, "metrics": metrics}
    write_json(config.run_dir / "summary.json", summary, indent=2, default=str)
    return FinetuneResult(config.run_dir, config.checkpoint_dir / "epoch_latest.pt",
                          result.checkpoint.path if result.checkpoint else None, metrics, plot)
