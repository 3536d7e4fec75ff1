"""TrainConfig: every flag of cn_clip's training/main.py (same names, dash spelling on
the command line) plus the Ray Train / DeepSpeed options."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import clip_models

from .. import config as config_io
from ..encode.precision import PRECISIONS

BACKENDS = ("deepspeed", "ddp")
TRACKERS = ("tensorboard", "mlflow")
DEFAULT_TOWERS = ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")  # cn_clip's defaults


def default_optimizer_params(vision_model: str) -> dict[str, float]:
    """cn_clip's per-model AdamW defaults (from the CLIP paper)."""
    if vision_model.startswith("RN"):
        return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}
    if vision_model in ("ViT-L-14", "ViT-L-14-336"):
        return {"lr": 4.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}


@dataclass(frozen=True)
class TrainConfig:
    # data
    train_data: str = ""  # LMDB split dir, caption JSON, or webdataset shards (.tar, glob, {00..99}, URI)
    val_data: str | None = None  # validation data, any kind --train-data takes
    num_workers: int = 4  # parallel decode tasks feeding each training worker
    valid_num_workers: int = 1  # parallel decode tasks for validation
    context_length: int = 52  # max tokens per text, [CLS] and [SEP] included
    use_augment: bool = False  # RandomResizedCrop + flip + AutoAugment on training images
    # logging
    logs: str = "./logs/"  # output root: {logs}/{name}/out_*.log, checkpoints/, plots
    name: str = "train_clip"  # run name; a rerun with the same name resumes
    log_interval: int = 10  # log a training line every N steps
    report_training_batch_acc: bool = False  # add in-batch accuracies to training lines
    debug: bool = False  # debug-level logging
    record_sample_ids: bool = False  # audit: write every step's pair indices to {logs}/{name}/sample_ids.jsonl
    # schedule
    batch_size: int = 64  # per worker
    valid_batch_size: int = 64  # per worker
    max_steps: int | None = None  # wins over max_epochs
    max_epochs: int = 32  # training epochs (unless --max-steps)
    valid_step_interval: int | None = None  # validate every N steps (None: off)
    valid_epoch_interval: int | None = 1  # validate every N epochs (None: off)
    # optimiser
    lr: float | None = None  # None: cn_clip's per-model default
    beta1: float | None = None  # AdamW beta1 (None: cn_clip's per-model default)
    beta2: float | None = None  # AdamW beta2 (None: cn_clip's per-model default)
    eps: float | None = None  # AdamW epsilon (None: cn_clip's per-model default)
    wd: float = 0.2  # weight decay (not on gains, biases, logit_scale)
    warmup: int = 500  # linear warm-up steps before cosine decay
    # checkpoints
    save_epoch_frequency: int = 1  # write a checkpoint every N epochs
    save_step_frequency: int = -1  # -1: off
    resume: str | None = None  # any checkpoint clip_models.load accepts
    reset_optimizer: bool = False  # start the optimiser afresh after --resume
    reset_data_offset: bool = False  # restart the data at epoch 0, step 0 after --resume
    # model
    precision: Literal[PRECISIONS] = "amp"  # amp and fp16 need a GPU (CPU runs fp32)
    vision_model: str | None = None  # a name in clip_models/configs (default: --resume's tower, else ViT-B-16)
    text_model: str | None = None  # a text tower name in clip_models/configs (default: --resume's, else RoBERTa)
    mask_ratio: float = 0.0  # FLIP: share of image patches dropped in training (ViT only)
    clip_weight_path: str | None = None  # OpenAI CLIP weights (JIT archive or state dict) for vision + logit_scale
    bert_weight_path: str | None = None  # Chinese BERT weights (HF directory or state dict) for the text tower
    freeze_vision: bool = False  # train the text tower only (RN50 BatchNorm statistics frozen too)
    freeze_text: bool = False  # train the vision tower only (BERT and the text projection frozen)
    unfrozen_vision_layers: int | None = None  # freeze the vision tower but its last N blocks and its head
    unfrozen_text_layers: int | None = None  # freeze the text tower but its last N layers and its projection
    lora_rank: int = 0  # LoRA adapters of this rank on --lora-targets, trained alone (0: off; peft)
    lora_alpha: float = 16.0  # LoRA scaling alpha: the update is alpha / rank * B @ A
    lora_targets: str = ""  # comma list of linear-layer names to adapt (default: every block's, both towers)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    use_flash_attention: bool = False  # cn_clip flag; SDPA picks flash kernels on GPU regardless
    use_bn_sync: bool = False  # SyncBatchNorm for RN50
    accum_freq: int = 1  # gradient accumulation with cn_clip's feature cache
    gather_with_grad: bool = False  # all_gather with gradients (torch.distributed.nn)
    skip_aggregate: bool = False  # contrast only within each worker's batch
    seed: int = 123  # sample order and initialisation
    # distillation (teacher: any checkpoint clip_models.load accepts)
    distillation: bool = False  # add a distillation loss towards --teacher-model-name
    teacher_model_name: str | None = None  # the teacher: any checkpoint clip_models.load accepts
    kd_loss_weight: float = 0.5  # weight of the distillation loss
    # Ray Train / DeepSpeed
    workers: int = 1  # Ray Train workers (one per GPU with --use-gpu)
    use_gpu: bool = False  # one GPU per training worker
    cpus_per_worker: str | float = "auto"  # CPUs per training worker; auto: the cluster's, shared with decoding
    backend: Literal[BACKENDS] = "deepspeed"  # DeepSpeed (ZeRO) or PyTorch DDP
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0..3
    storage_path: str | None = None  # Ray Train storage (local dir or s3://); default {logs}/ray_results
    num_to_keep: int = 2  # Ray Train checkpoints kept (latest)
    max_failures: int = 1  # worker-group restarts from the last checkpoint
    ema_decay: float = 0.0  # a moving average of the weights with this decay (0: off), validated and saved too
    max_bad_steps: int = 10  # steps in a row with a non-finite loss (each skipped on every worker) before the run stops
    # tracking and zero-shot evaluation
    report_to: str = ""  # comma list of trackers that get metrics.jsonl's metrics: tensorboard, mlflow
    mlflow_tracking_uri: str | None = None  # MLflow server or store (default: {logs}/{name}/mlruns, a local file store)
    zeroshot_data: str | None = None  # an ELEVATER dataset dir (label_cn.txt, test/<label id>/*): zero-shot top-1/5
    zeroshot_frequency: int = 1  # zero-shot evaluation every N epochs (and at the end)

    def __post_init__(self):
        self._absolute_paths()
        self._architecture()
        self._check_choices()
        self._check_sizes()
        self._check_model()
        for name, value in default_optimizer_params(self.vision_model).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def _absolute_paths(self):
        """Workers do not share the driver's working directory: local paths become absolute
        (names such as --resume ViT-B-16 and URLs such as s3://... stay as given)."""
        for name in ("train_data", "val_data", "logs", "storage_path", "resume", "clip_weight_path",
                     "bert_weight_path", "teacher_model_name", "zeroshot_data"):
            value = getattr(self, name)
            if not value or "://" in value:
                continue
            path = Path(value).expanduser()
            if name in ("logs", "storage_path", "train_data", "val_data") or path.exists():
                object.__setattr__(self, name, str(path.resolve()))

    def _architecture(self):
        """Towers not named are --resume's (read from the checkpoint without loading it, as embed
        does), or cn_clip's defaults without one."""
        if self.vision_model and self.text_model:
            return
        names = DEFAULT_TOWERS
        if self.resume:
            from clip_models.checkpoint import inspect_checkpoint

            names = tuple(inspect_checkpoint(self.resume).struct_name().split("@"))
            if "custom" in names:
                raise ValueError(f"--resume {self.resume} holds towers that are not named configs ({'@'.join(names)}); "
                                 f"give --vision-model and --text-model")
        object.__setattr__(self, "vision_model", self.vision_model or names[0])
        object.__setattr__(self, "text_model", self.text_model or names[1])

    def _check_choices(self):
        if not self.train_data:
            raise ValueError("--train-data is required (an LMDB split dir such as datasets/MUGE/lmdb/train)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"--zero-stage must be 0..3, got {self.zero_stage}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("--precision fp16 needs --use-gpu (CPU training runs fp32 or bf16)")
        if self.freeze_vision and self.freeze_text:
            raise ValueError("--freeze-vision and --freeze-text together leave nothing to train")
        for tower in ("vision", "text"):
            unfrozen = getattr(self, f"unfrozen_{tower}_layers")
            if unfrozen is not None and getattr(self, f"freeze_{tower}"):
                raise ValueError(f"--freeze-{tower} freezes the whole tower; --unfrozen-{tower}-layers {unfrozen} "
                                 f"keeps some of it training: give one")
            if unfrozen is not None and unfrozen < 0:
                raise ValueError(f"--unfrozen-{tower}-layers must not be negative, got {unfrozen}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_decay and self.backend == "deepspeed" and self.zero_stage == 3:
            raise ValueError("--ema-decay needs whole weights on every worker: use --zero-stage 2 or lower")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must not be negative, got {self.lora_rank}")
        if self.lora_rank:
            frozen = [flag for flag, on in (("--freeze-vision", self.freeze_vision), ("--freeze-text", self.freeze_text),
                                            ("--unfrozen-vision-layers", self.unfrozen_vision_layers is not None),
                                            ("--unfrozen-text-layers", self.unfrozen_text_layers is not None)) if on]
            if frozen:
                raise ValueError(f"--lora-rank trains adapters alone, every weight of the model stays frozen: "
                                 f"{frozen[0]} does not combine with it (choose the layers with --lora-targets)")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        if unknown:
            raise ValueError(f"--report-to {unknown[0]}: the trackers are {', '.join(TRACKERS)}")
        if self.distillation and not self.teacher_model_name:
            raise ValueError("--distillation needs --teacher-model-name (any checkpoint clip_models.load accepts)")

    def _check_sizes(self):
        if self.cpus_per_worker != "auto":
            try:
                cpus = float(self.cpus_per_worker)
            except (TypeError, ValueError):
                raise ValueError(f"--cpus-per-worker must be auto or a number, got {self.cpus_per_worker!r}") from None
            if not cpus > 0:
                raise ValueError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
            object.__setattr__(self, "cpus_per_worker", str(self.cpus_per_worker))
        for name in ("batch_size", "valid_batch_size", "accum_freq", "workers", "num_workers",
                     "valid_num_workers", "log_interval", "num_to_keep", "max_bad_steps", "zeroshot_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.max_epochs < 1:
            raise ValueError(f"--max-epochs must be at least 1, got {self.max_epochs}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}")
        if self.warmup < 0 or self.context_length < 2:
            raise ValueError("--warmup must be >= 0 and --context-length >= 2")

    def _check_model(self):
        model = self.model_config()  # raises for unknown names
        if self.distillation:  # every worker loads it: a mistake is one line here, not a failed run
            config_io.check_model(self.teacher_model_name)
        # Ray Train's storage and the run's folder: a URI for the first, a local or shared path for --logs.
        config_io.check_output(self.storage_path, "--storage-path", directory=True, uri=None)
        config_io.check_output(self.logs, "--logs", directory=True)
        layers = {"vision": len(model.vision.layers) if model.vision.is_resnet else model.vision.layers,
                  "text": model.text.num_layers}
        for tower, count in layers.items():
            unfrozen = getattr(self, f"unfrozen_{tower}_layers")
            if unfrozen is not None and unfrozen > count:
                name = getattr(self, f"{tower}_model")
                raise ValueError(f"--unfrozen-{tower}-layers {unfrozen}: the {tower} tower of {name} has {count}")
        if self.mask_ratio > 0 and model.vision.is_resnet:
            raise ValueError(f"--mask-ratio (FLIP) works on ViT towers only, not {self.vision_model}")
        config_io.check_context_length(self.context_length, model, self.text_model)
        if self.lora_rank:
            import torch

            from .lora import add_lora

            with torch.device("meta"):  # names only: no memory, no initialisation
                add_lora(clip_models.CLIP(model), self.lora_rank, self.lora_alpha, self.lora_targets)

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.report_to.split(",") if name.strip())

    def model_config(self) -> clip_models.CLIPConfig:
        return clip_models.config_from_names(self.vision_model, self.text_model)

    @property
    def run_dir(self) -> Path:
        return Path(self.logs) / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.workers * self.accum_freq

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
