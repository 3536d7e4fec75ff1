"""The driver of finetuning, `run_finetune`: the checks made before any worker starts (the
data, the trackers' packages, the CPUs and GPUs per worker), a Ray Train TorchTrainer over
`trainer.train_loop_per_worker`, then the run's summary, plot and `FinetuneResult`."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..ray_context import largest_node_cpus
from ..io import write_json
from .checkpoints import RunMismatch
from .config import TrainConfig
from .data import DECODE_CPUS, count_pairs
from .plan import Plan
from .plot import plot_run
from .trainer import NonFiniteTraining, train_loop_per_worker

log = logging.getLogger(__name__)

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
    if config.zeroshot_data:
        from ..data import read_labels, zeroshot_images

        zeroshot_images(config.zeroshot_data, len(read_labels(config.zeroshot_data)))
    for tracker, module in (("tensorboard", "tensorboardX"), ("mlflow", "mlflow")):
        if tracker in config.trackers and importlib.util.find_spec(module) is None:
            raise ValueError(f"--report-to {tracker} needs the {module} package (pip install {module})")


STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
MIN_WORKER_CPUS = 0.25  # auto: a training worker gets at least this much of a CPU
GPU_WORKER_CPUS = 2.0  # auto, with --use-gpu: the GPU computes; a worker needs a CPU or two


def worker_cpus(config: TrainConfig, total: float, largest_node: float) -> float:
    """CPUs reserved per training worker. Decoding runs as Ray Data tasks beside the workers,
    so DECODE_CPUS stay free. auto: the rest shared by the workers (capped at the largest node,
    where one worker must fit; with GPUs, GPU_WORKER_CPUS). A command that cannot run is refused."""
    if config.use_gpu:
        return _fits(config, float(config.cpus_per_worker) if config.cpus_per_worker != "auto"
                     else min(GPU_WORKER_CPUS, max(MIN_WORKER_CPUS, (total - DECODE_CPUS) / config.workers)), total)
    if config.cpus_per_worker != "auto":
        return _fits(config, float(config.cpus_per_worker), total)
    share = min(largest_node, (total - DECODE_CPUS) / config.workers)
    share = int(share * 20) / 20  # in twentieths: 2 workers on 2 CPUs get 0.75 each
    if share < MIN_WORKER_CPUS:
        raise ValueError(f"{config.workers} training workers on {total:g} CPUs would get {max(share, 0):g} CPUs each "
                         f"beside data decoding ({DECODE_CPUS:g}); lower --workers or add nodes")
    return share


def _fits(config: TrainConfig, cpus: float, total: float) -> float:
    spare = total - config.workers * cpus
    if spare < DECODE_CPUS:
        raise ValueError(
            f"{config.workers} training workers x {cpus:g} CPUs leave {spare:g} of the cluster's {total:g} CPUs "
            f"for data decoding; lower --cpus-per-worker (or leave it auto) or --workers, or add nodes")
    return cpus


def check_resources(config: TrainConfig, resources: dict, largest_node: float) -> float:
    """The CPUs per training worker (worker_cpus), and GPUs for every worker with --use-gpu."""
    if config.use_gpu and resources.get("GPU", 0) < config.workers:
        raise ValueError(f"--use-gpu with {config.workers} workers needs {config.workers} GPUs; "
                         f"the cluster has {resources.get('GPU', 0):g}")
    return worker_cpus(config, resources.get("CPU", 0), largest_node)


def run_finetune(config: TrainConfig) -> FinetuneResult:
    """Finetune on the cluster: every worker runs `train_loop_per_worker` (trainer.Trainer)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_data(config)
    if not ray.is_initialized():
        ray.init()  # embedded local Ray, or the cluster of `ray job submit`
    cpus = check_resources(config, ray.cluster_resources(), largest_node_cpus())
    log.info("%d training worker(s) with %g CPUs each", config.workers, cpus)
    storage = config.storage_path or str(Path(config.logs) / "ray_results")
    # The dashboard's Train view lists runs and their workers only with state tracking on (Ray 2.60:
    # read here, in the driver, when the trainer builds its callbacks). A user's 0 stays.
    os.environ.setdefault(STATE_TRACKING, "1")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=config.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train hands back the workers' traceback as text
        stopped = re.search(r"(NonFiniteTraining|RunMismatch): (.+)", str(exc))
        if stopped is None:
            raise
        raise (NonFiniteTraining if stopped.group(1) == "NonFiniteTraining" else RunMismatch)(
            stopped.group(2).strip()) from None
    metrics = dict(result.metrics or {})
    plot = plot_run(config.run_dir)
    summary = {"run_dir": str(config.run_dir), "checkpoint": str(config.checkpoint_dir / "epoch_latest.pt"),
               "ray_checkpoint": result.checkpoint.path if result.checkpoint else None, "metrics": metrics}
    write_json(config.run_dir / "summary.json", summary, indent=2, default=str)
    return FinetuneResult(config.run_dir, config.checkpoint_dir / "epoch_latest.pt",
                          result.checkpoint.path if result.checkpoint else None, metrics, plot)
