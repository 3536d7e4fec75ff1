"""A run's checkpoints: restore at the start (Ray Train's latest checkpoint, or --resume) and
save at cn_clip's save points, in both layouts: the Ray Train checkpoint (every worker's
optimizer shard; rank 0's weights, position, EMA and LoRA adapter) and cn_clip's
epoch_latest.pt / epoch{E}.pt / epoch_{E}_{S}.pt files."""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

import clip_models

from ..io import atomic_path, write_json
from . import lora
from .config import TrainConfig
from .engine import Engine
from .plan import Position
from .run_log import RunLogger

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
EMA_FILE = "ema.pt"
log = logging.getLogger("clip_platform.train")


class RunMismatch(ValueError):
    """A run started again under its name with settings its checkpoint cannot continue."""


class Checkpointer:
    """One worker's side of the run's checkpoints: `restore` once at the start, `save` at each
    save point (every worker takes part: its optimizer shard, Ray Train's report)."""

    def __init__(self, config: TrainConfig, engine: Engine, rank: int, logger: RunLogger):
        self.config = config
        self.engine = engine
        self.rank = rank
        self.logger = logger

    # ------------------------------------------------------------ restore
    def restore(self) -> tuple[Position, dict | None]:
        """Restore the run's weights; returns its position, and the moving average a Ray Train
        checkpoint holds (--ema-decay), if any."""
        import ray.train

        # Ray Train hands back the run's latest checkpoint after a worker-group restart,
        # and when a run of the same name and storage_path is started again.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                return self._restore_ray_checkpoint(Path(directory))
        if self.config.resume:
            return self._restore_file(self.config.resume), None
        return Position(), None

    def _restore_ray_checkpoint(self, directory: Path) -> tuple[Position, dict | None]:
        state = json.loads((directory / STATE_FILE).read_text())
        if self.config.lora_rank != (directory / lora.ADAPTER_DIR).is_dir():
            raise RunMismatch(f"run {self.config.name!r} resumes from {directory}, trained "
                              f"{'without' if self.config.lora_rank else 'with'} LoRA; this command asks "
                              f"{'for' if self.config.lora_rank else 'for no'} --lora-rank: give another --name")
        if self.config.lora_rank:
            # The checkpoint's model.pt holds merged weights; the frozen base is the run's start
            # (its --resume, or the seeded initialisation), the adapters are the checkpoint's.
            if self.config.resume:
                self._restore_file(self.config.resume)
            lora.load_adapter(self.engine.module, directory / lora.ADAPTER_DIR)
        else:
            self.engine.load_model_state(clip_models.read_checkpoint(directory / MODEL_FILE)[0])
        self.engine.load(directory, load_optimizer=True)
        position = Position(**state["position"])
        self.logger.info(f"=> resumed from checkpoint {directory} at epoch {position.epoch + 1}, "
                         f"step {position.global_step}")
        ema = directory / EMA_FILE
        return position, torch.load(ema, map_location=self.engine.device, weights_only=True) if ema.is_file() \
            else None

    def _restore_file(self, path: str) -> Position:
        """--resume: any checkpoint clip_models.load accepts; cn_clip's epoch/step/optimizer too
        when it is a file given by path (a released name starts from its weights only)."""
        meta = {}  # filled by the one read of the file
        sd, _, kind = clip_models.read_checkpoint(clip_models.resolve(path),
                                                  meta=meta if Path(path).is_file() else None)
        try:
            self.engine.load_model_state(lora.to_wrapped_keys(sd, self.engine.module) if self.config.lora_rank else sd,
                                         strict=not self.config.lora_rank)
        except RuntimeError as exc:
            raise ValueError(f"--resume {path} does not fit {self.config.vision_model}@{self.config.text_model}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        position = Position()
        if not self.config.reset_data_offset and "step" in meta:
            saved = meta.get("data_position") or {"epoch": meta.get("epoch", 0), "step_in_epoch": 0}
            position = Position(saved["epoch"], saved["step_in_epoch"], int(meta["step"]))
        if not self.config.reset_optimizer and meta.get("optimizer") and self.config.backend == "ddp":
            self.engine.optimizer.load_state_dict(meta["optimizer"])
            self.logger.info("=> optimizer state is restored from the checkpoint")
        self.logger.info(f"=> loaded {kind} '{path}' (epoch {position.epoch} @ {position.global_step} steps)")
        return position

    # ------------------------------------------------------------ save
    def save(self, position: Position, metrics: dict, ema, epoch_end: int | None, step_file: bool = False,
             final: bool = False) -> None:
        """Ray Train checkpoint (every worker: its optimizer shard) plus cn_clip-layout
        files from rank 0, at cn_clip's save points; `metrics` go with it to Ray Train."""
        import ray.train

        config = self.config
        raw_state = self.engine.model_state()
        model_state = lora.merged_state(raw_state, config.lora_alpha / config.lora_rank) if config.lora_rank \
            else raw_state
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            self.engine.save(directory)
            if self.rank == 0:
                write_ray_checkpoint(directory, self.engine.module, model_state, position)
                if config.lora_rank:  # the adapter on its own, in the Ray checkpoint and beside epoch_latest.pt
                    for folder in (directory / lora.ADAPTER_DIR, config.checkpoint_dir / "epoch_latest.lora"):
                        lora.save_adapter(folder, raw_state, config.lora_rank, config.lora_alpha,
                                          self.engine.module.lora_targets)
                if ema is not None:
                    torch.save(ema.state_dict(), directory / EMA_FILE)
                    with ema.applied(self.engine.module):
                        ema_state = self.engine.model_state()
                    if config.lora_rank:
                        ema_state = lora.merged_state(ema_state, config.lora_alpha / config.lora_rank)
                    write_ema_file(config, ema_state, position)
                write_cn_clip_files(config, model_state, position, epoch_end, step_file, final,
                                    self.engine.optimizer_state_for_cn_clip())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_ray_checkpoint(directory: Path, model, model_state: dict, position) -> None:
    """Rank 0's part of a Ray Train checkpoint: weights with their config (clip_models' own
    format), and the position."""
    clip_models.save_checkpoint(model_state, directory / MODEL_FILE, config=model.config)
    write_json(directory / STATE_FILE, {"position": dataclasses.asdict(position)})


def write_ema_file(config: TrainConfig, ema_state: dict, position) -> None:
    """The averaged weights beside the raw ones: epoch_latest.ema.pt, in cn_clip's layout."""
    with atomic_path(config.checkpoint_dir / "epoch_latest.ema.pt") as tmp:
        clip_models.export_cn_clip(ema_state, tmp, epoch=position.epoch, step=position.global_step, name=config.name)


def write_cn_clip_files(config: TrainConfig, model_state: dict, position, epoch_end: int | None,
                        step_file: bool, final: bool, optimizer: dict | None) -> None:
    """cn_clip's files: epoch_latest.pt always, epoch{E}.pt at save epochs and the end,
    epoch_{E}_{S}.pt at save steps. `data_position` lets our --resume continue mid-epoch."""
    epoch_number = position.epoch if epoch_end is not None else position.epoch + 1
    data_position = {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch}
    out = config.checkpoint_dir
    out.mkdir(parents=True, exist_ok=True)
    names = ["epoch_latest.pt"]
    if step_file:
        names.append(f"epoch_{epoch_number}_{position.global_step}.pt")
    if epoch_end is not None and (config.save_epoch_frequency > 0 and epoch_end % config.save_epoch_frequency == 0):
        names.append(f"epoch{epoch_end}.pt")
    if final:
        names.append(f"epoch{epoch_number}.pt")
    for name in dict.fromkeys(names):
        # Atomic: a worker killed mid-save leaves the previous epoch_latest.pt, not half a file.
        with atomic_path(out / name) as tmp:
            clip_models.export_cn_clip(model_state, tmp, epoch=epoch_number, step=position.global_step,
                                       name=config.name, optimizer=optimizer, data_position=data_position)
        log.info(f"Saved checkpoint {out / name} (epoch {epoch_number} @ {position.global_step} steps)")

