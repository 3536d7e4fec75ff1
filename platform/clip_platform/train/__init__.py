"""Finetuning on Ray Train workers with DeepSpeed (or DDP): `run_finetune(TrainConfig)`."""
from .config import TrainConfig
from .trainer import FinetuneResult, run_finetune

__all__ = ["FinetuneResult", "TrainConfig", "run_finetune"]
