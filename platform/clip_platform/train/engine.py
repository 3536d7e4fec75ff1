"""The model under distribution: DeepSpeed (ZeRO 0-3) or DDP, behind one small
interface. Distribution is applied here, from outside the model; `world` and
`gather_objects` are the worker group's rank and its one object collective."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from clip_models import CLIP

from .config import TrainConfig

LOGIT_SCALE_MAX = 4.6052  # ln(100), as the CLIP paper and cn_clip


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(value, merge: bool = True):
    """all_gather_object; with merge, dicts are merged into one."""
    _, world_size = world()
    parts = [value]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, value)
    if not merge:
        return parts
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """cn_clip's AdamW groups, by the same name test: no decay where the name holds
    "bn", "ln", "bias" or "logit_scale" (BERT's "LayerNorm" gains do decay there too)."""
    def exclude(name: str) -> bool:
        return "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n)], "weight_decay": weight_decay},
    ]


def autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of the forward pass (DDP), or None for fp32."""
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision in ("amp", "fp16") and config.use_gpu:
        return torch.float16
    return None  # "amp" on CPU trains in fp32, as the CPU has no fp16 matmul worth using


class Engine:
    """forward / backward / step / checkpoint for one worker, either backend."""

    def __init__(self, model: CLIP, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device
        self.module = model
        self.scalar_params = lift_scalar_params(model) if config.backend == "deepspeed" else set()
        optimizer = torch.optim.AdamW(param_groups(model, config.wd), lr=config.lr,
                                      betas=(config.beta1, config.beta2), eps=config.eps)
        if config.backend == "deepspeed":
            self._init_deepspeed(model, optimizer)
        else:
            self._init_ddp(model, optimizer)

    # ------------------------------------------------------------ setup
    def _init_deepspeed(self, model: CLIP, optimizer) -> None:
        import deepspeed

        _, world_size = world()
        ds_config = {
            "train_micro_batch_size_per_gpu": self.config.batch_size,
            "gradient_accumulation_steps": self.config.accum_freq,
            "train_batch_size": self.config.batch_size * self.config.accum_freq * world_size,
            "zero_optimization": {"stage": self.config.zero_stage},
            "steps_per_print": 10**9,  # we log ourselves, in cn_clip's format
            "wall_clock_breakdown": False,
        }
        if self.config.precision == "bf16":
            ds_config["bf16"] = {"enabled": True}
        elif self.config.precision in ("amp", "fp16") and self.config.use_gpu:
            ds_config["fp16"] = {"enabled": True, "initial_scale_power": 16}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
        self.base_optimizer = optimizer
        self.wrapped = self.engine
        self.scaler = None

    def _init_ddp(self, model: CLIP, optimizer) -> None:
        model.to(self.device)
        if self.config.use_bn_sync:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        _, world_size = world()
        if world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                               static_graph=self.config.grad_checkpointing)
        else:
            self.wrapped = model
        self.optimizer = self.base_optimizer = optimizer
        fp16 = autocast_dtype(self.config) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.engine = None

    # ------------------------------------------------------------ training
    def autocast(self):
        dtype = autocast_dtype(self.config)
        if self.engine is not None or dtype is None:
            return contextlib.nullcontext()  # DeepSpeed casts itself
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self, images, tokens, mask_ratio: float = 0.0):
        with self.autocast():
            return self.wrapped(images, tokens, mask_ratio)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward for one accumulation pass; the optimizer steps after the `last` one.
        Each pass already carries the whole batch's loss (cn_clip's feature cache), so
        gradients add up unscaled."""
        if self.engine is not None:
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed counts micro-steps and updates on the boundary
        else:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if last:
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if last:
            self._clamp_logit_scale()

    def set_lr(self, lr: float) -> None:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.base_optimizer.param_groups[0]["lr"]

    def _clamp_logit_scale(self) -> None:
        with self.gathered([self.module.logit_scale], modify=True):
            self.module.logit_scale.data.clamp_(0, LOGIT_SCALE_MAX)

    def gathered(self, params, modify: bool = False):
        """Full parameters under ZeRO-3 (partitioned otherwise invisible); a no-op elsewhere."""
        if self.engine is not None and self.config.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
        return contextlib.nullcontext()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # ------------------------------------------------------------ state
    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state dict on CPU (gathered from ZeRO-3 partitions), in the
        model's own shapes."""
        with self.gathered(list(self.module.parameters())):
            state = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        for name in self.scalar_params:
            state[name] = state[name].reshape(())
        return state

    def save(self, directory: Path) -> None:
        """Optimizer (and DeepSpeed engine) state of this rank into `directory`."""
        rank, _ = world()
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)
        elif rank == 0:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path, load_optimizer: bool = True) -> None:
        if self.engine is not None:
            self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                        load_optimizer_states=load_optimizer,
                                        load_lr_scheduler_states=False, load_module_strict=True)
            return
        if load_optimizer and (directory / "optimizer.pt").is_file():
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device,
                                                      weights_only=True))

    def load_model_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load the model's weights; strict=False lets LoRA adapters (and only them) keep their own."""
        state = {k: v.reshape(1) if k in self.scalar_params else v for k, v in state.items()}
        with self.gathered(list(self.module.parameters()), modify=True):
            missing, unexpected = self.module.load_state_dict(state, strict=strict)
        missing = [k for k in missing if ".lora_" not in k]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")

    def optimizer_state_for_cn_clip(self) -> dict | None:
        """cn_clip's .pt holds a torch AdamW state; DeepSpeed's partitioned state has no such form."""
        return self.optimizer.state_dict() if self.engine is None else None


def lift_scalar_params(model: nn.Module) -> set[str]:
    """Give 0-dim parameters (logit_scale) shape [1]: DeepSpeed's initial broadcast
    views every parameter as bytes, which a 0-dim tensor cannot be. All uses of
    logit_scale broadcast the same; model_state() restores the model's shapes."""
    lifted = set()
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(owner, name.rpartition(".")[2], nn.Parameter(param.detach().reshape(1),
                                                                  requires_grad=param.requires_grad))
            lifted.add(name)
    return lifted


def select_device(config: TrainConfig) -> torch.device:
    if config.use_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU workers: gloo + its CPU accelerator
    return torch.device("cpu")
