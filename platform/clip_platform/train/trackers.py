"""--report-to tensorboard,mlflow: the metrics of metrics.jsonl, every record as it is written,
also go to TensorBoard (event files under {logs}/{name}/tensorboard, through tensorboardX) and
to MLflow (through Ray Train's `setup_mlflow`, on rank 0 only; the run's flags become its
parameters). MLflow logs to --mlflow-tracking-uri, by default a file store in {logs}/{name}/mlruns
(MLflow 3 keeps the file store in maintenance mode; give sqlite:///... or http://... for a
database or a server)."""
from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path

from .config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"


def mlflow_uri(config: TrainConfig) -> str:
    return config.mlflow_tracking_uri or (config.run_dir / MLRUNS_DIR).as_uri()


class Trackers:
    """Rank 0's trackers; `log(record)` takes a metrics.jsonl record (it has a "step")."""

    def __init__(self, config: TrainConfig):
        self.tensorboard = self.mlflow = None
        if "tensorboard" in config.trackers:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(config.run_dir) / TENSORBOARD_DIR))
        if "mlflow" in config.trackers:
            from ray.air.integrations.mlflow import setup_mlflow

            uri = mlflow_uri(config)
            if uri.startswith("file:") or "://" not in uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            params = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
            self.mlflow = setup_mlflow(params, tracking_uri=uri, experiment_name=config.name, run_name=config.name,
                                       create_experiment_if_not_exists=True, rank_zero_only=False)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
