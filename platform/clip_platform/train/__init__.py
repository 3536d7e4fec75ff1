"""Finetuning on Ray Train workers with DeepSpeed (or DDP): `run_finetune(TrainConfig)`.

By phase, one concern per module:

* `config`       TrainConfig: cn_clip's training flags plus the Ray Train / DeepSpeed options
* `driver`       run_finetune: the checks before any worker starts, the TorchTrainer, the result
* `trainer`      Trainer, on every worker: fit, epochs, the step, the loss, the non-finite guard;
                 train_loop_per_worker, Ray Train's entry point
* `plan`         the deterministic sample plan, and the Position in it a run resumes from
* `data`         each worker's planned pairs, read and decoded in Ray Data tasks
* `engine`       the model under DeepSpeed or DDP; the worker group's rank and object gather
* `objective`    the contrastive loss across workers, and distillation
* `ema`, `lora`  --ema-decay's moving average; --lora-rank's adapters
* `validation`   validation loss, accuracy and recall (the evaluate job's hit rule)
* `zeroshot`     zero-shot classification during training (--zeroshot-data)
* `checkpoints`  restore and save: Ray Train checkpoints and cn_clip's files
* `run_log`      the run's log, params, metrics.jsonl and sample audit on rank 0
* `trackers`     --report-to tensorboard / mlflow
* `plot`         the run's curves
"""
from .config import TrainConfig
from .driver import FinetuneResult, run_finetune

__all__ = ["FinetuneResult", "TrainConfig", "run_finetune"]
