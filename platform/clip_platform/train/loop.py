"""`train_loop_per_worker`: what every Ray Train worker runs. cn_clip's training
step, logging and checkpoint points, on the deterministic sample plan."""
from __future__ import annotations

import json
import logging
import math
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import clip_models

from . import checkpoints, lora
from .config import TrainConfig
from .data import SampleDecoder, open_pairs, stream_batches
from .ema import EMA
from .engine import Engine, select_device, world
from .objective import contrastive
from .plan import Plan, validation_indices
from .zeroshot import ZeroShotEval

log = logging.getLogger("clip_platform.train")


@dataclass
class Position:
    """Where training stands: the next step to run."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def cosine_lr(base_lr: float, warmup: int, total_steps: int, step: int) -> float:
    """cn_clip's schedule: linear warm-up, then cosine decay to 0 at total_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))) * base_lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: TrainConfig) -> clip_models.CLIP:
    model = clip_models.CLIP(config.model_config())
    if config.clip_weight_path or config.bert_weight_path:
        from clip_models.pretrained import init_from_pretrained

        init_from_pretrained(model, config.clip_weight_path, config.bert_weight_path)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if config.freeze_vision or config.unfrozen_vision_layers is not None:
        model.freeze_vision(config.unfrozen_vision_layers or 0)
    if config.freeze_text or config.unfrozen_text_layers is not None:
        model.freeze_text(config.unfrozen_text_layers or 0)
    if config.lora_rank:
        model.lora_targets = lora.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    return model


def load_teacher(config: TrainConfig, device: torch.device):
    if not config.distillation:
        return None
    teacher, _ = clip_models.load(config.teacher_model_name, device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


class Trainer:
    """State of one worker's run; methods are the phases of cn_clip's main/train."""

    def __init__(self, config: TrainConfig, faults: dict | None = None):
        self.config = config
        self.faults = faults or {}  # tests: {"nonfinite": {step: [ranks]}} makes those ranks' loss NaN there
        self.rank, self.world_size = world()
        seed_everything(config.seed)
        self.device = select_device(config)
        self.train_pairs = open_pairs(config.train_data)
        self.val_pairs = open_pairs(config.val_data) if config.val_data else None
        self.plan = Plan(len(self.train_pairs), config.batch_size, self.world_size, config.accum_freq,
                         config.seed)
        self.total_steps, self.max_epochs = self._schedule_length()
        self.engine = Engine(build_model(config), config, self.device)
        self.ema = None  # made from the weights the run starts with (after _restore)
        self.teacher = load_teacher(config, self.device)
        self.zeroshot = ZeroShotEval(config.zeroshot_data, self.rank, self.world_size, config.valid_batch_size,
                                     config.context_length) if config.zeroshot_data else None
        self._zeroshot_step = -1
        self.position = Position()
        self._saved_step = -1
        self.last_validation: dict = {}
        self.bad_records: list[str] = []
        self.bad_steps = self.skipped_steps = 0  # non-finite steps: in a row, and in all
        self.last_checkpoint: str | None = None
        self.logger = checkpoints.RunLogger(config, self.rank)
        self.logger.worker_nodes(gather_objects(worker_node(), merge=False))
        saved_ema = self._restore()
        if config.ema_decay:
            self.ema = EMA(self.engine.module, config.ema_decay)
            if saved_ema is not None:  # a resumed run continues its average
                self.ema.load_state_dict(saved_ema)

    def _schedule_length(self) -> tuple[int, int]:
        steps = self.plan.steps_per_epoch
        if self.config.max_steps is not None:
            return self.config.max_steps, math.ceil(self.config.max_steps / steps)
        return steps * self.config.max_epochs, self.config.max_epochs

    # ------------------------------------------------------------ restore
    def _restore(self) -> dict | None:
        """Restore the run's position and weights; returns the moving average a Ray Train
        checkpoint holds (--ema-decay), if any."""
        import ray.train

        # Ray Train hands back the run's latest checkpoint after a worker-group restart,
        # and when a run of the same name and storage_path is started again.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                return self._restore_ray_checkpoint(Path(directory))
        if self.config.resume:
            self._restore_file(self.config.resume)
        return None

    def _restore_ray_checkpoint(self, directory: Path) -> dict | None:
        state = json.loads((directory / checkpoints.STATE_FILE).read_text())
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
            self.engine.load_model_state(clip_models.read_checkpoint(directory / checkpoints.MODEL_FILE)[0])
        self.engine.load(directory, load_optimizer=True)
        self.position = Position(**state["position"])
        self.logger.info(f"=> resumed from checkpoint {directory} at epoch {self.position.epoch + 1}, "
                         f"step {self.position.global_step}")
        ema = directory / checkpoints.EMA_FILE
        return torch.load(ema, map_location=self.device, weights_only=True) if ema.is_file() else None

    def _restore_file(self, path: str) -> None:
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
        if not self.config.reset_data_offset and "step" in meta:
            position = meta.get("data_position") or {"epoch": meta.get("epoch", 0), "step_in_epoch": 0}
            self.position = Position(position["epoch"], position["step_in_epoch"], int(meta["step"]))
        if not self.config.reset_optimizer and meta.get("optimizer") and self.config.backend == "ddp":
            self.engine.optimizer.load_state_dict(meta["optimizer"])
            self.logger.info("=> optimizer state is restored from the checkpoint")
        self.logger.info(f"=> loaded {kind} '{path}' (epoch {self.position.epoch} @ {self.position.global_step} steps)")

    # ------------------------------------------------------------ training
    def fit(self) -> None:
        self.logger.log_params(self.plan, self.total_steps)
        self.logger.info(("LoRA: " if self.config.lora_rank else "") + lora.trainable_summary(self.engine.module))
        while self.position.epoch < self.max_epochs and self.position.global_step < self.total_steps:
            epoch = self.position.epoch
            self.logger.info(f"Start epoch {epoch + 1}")
            self._train_epoch(epoch)
            if self.position.global_step >= self.total_steps and self.position.step_in_epoch < self.plan.steps_per_epoch:
                break  # stopped mid-epoch by max_steps; the final checkpoint below keeps the position
            self.position = Position(epoch + 1, 0, self.position.global_step)
            if self._due(self.config.valid_epoch_interval, epoch + 1):
                self.validate()
            if self._due(self.config.zeroshot_frequency, epoch + 1):
                self.zero_shot()
            self.save(epoch_end=epoch + 1)
        reported = dict(self.last_validation)
        if self.config.val_data and self.last_validation.get("step") != self.position.global_step:
            self.validate()  # a run stopped mid-epoch by max_steps still ends with a validation, as cn_clip
        if self._zeroshot_step != self.position.global_step:
            self.zero_shot()  # and with a zero-shot evaluation, when asked for
        # Also when evaluated after the last checkpoint (a run ending at an epoch's end whose
        # evaluation was not due): Ray Train's result keeps the metrics of its last checkpoint.
        if self._saved_step != self.position.global_step or self.last_validation != reported:
            self.save(epoch_end=None, final=True)
        self.logger.finish(self.bad_records)

    def _train_epoch(self, epoch: int) -> None:
        config = self.config
        indices = self.plan.rank_indices(epoch, self.rank, self.position.step_in_epoch)
        decoder = SampleDecoder(self.engine.module.image_size, config.context_length, config.use_augment)
        batches = stream_batches(self.train_pairs, decoder, indices, config.batch_size, config.num_workers)
        self.engine.train(True)
        end = time.perf_counter()
        while self.position.global_step < self.total_steps:
            micro = [next(batches, None) for _ in range(config.accum_freq)]
            if any(b is None for b in micro):
                break
            data_time = time.perf_counter() - end
            loss, acc = self._step(micro)
            self.position.step_in_epoch += 1  # a skipped step used its batch: the sample order stays
            self.position.global_step += 1
            self._count_nonfinite(loss)
            if self.ema is not None and math.isfinite(loss):
                self.ema.update(self.engine.module)
            batch_time = time.perf_counter() - end
            end = time.perf_counter()
            self._after_step(epoch, loss, acc, data_time, batch_time, micro)

    def _step(self, micro: list[dict[str, np.ndarray]]):
        config = self.config
        lr = cosine_lr(config.lr, config.warmup, self.total_steps, self.position.global_step)
        self.engine.set_lr(lr)
        tensors = [self._to_device(b) for b in micro]
        teacher = [self._teacher_features(images) for images, _, _ in tensors]
        if config.accum_freq == 1:
            images, tokens, valid = tensors[0]
            image_features, text_features, scale = self.engine.forward(images, tokens, config.mask_ratio)
            loss, acc = self._loss(image_features, text_features, scale, valid, teacher[0])
            if not self._finite(loss):
                return float("nan"), acc
            self.engine.backward(loss, last=True)
            return loss.item(), acc
        with torch.no_grad():  # cn_clip's feature cache: the other chunks serve as fixed negatives
            cache = [self.engine.forward(images, tokens) for images, tokens, _ in tensors]
        valid = torch.cat([v for _, _, v in tensors])
        teacher_all = torch.cat(teacher) if teacher[0] is not None else None
        for j, (images, tokens, _) in enumerate(tensors):
            image_j, text_j, scale = self.engine.forward(images, tokens, config.mask_ratio)
            image_features = torch.cat([c[0] for c in cache[:j]] + [image_j] + [c[0] for c in cache[j + 1:]])
            text_features = torch.cat([c[1] for c in cache[:j]] + [text_j] + [c[1] for c in cache[j + 1:]])
            last = j == len(tensors) - 1
            # Every pass holds the whole batch's loss: logit_scale takes its gradient from one
            # pass only, or it would get accum_freq times the full-batch gradient.
            loss, acc = self._loss(image_features, text_features, scale if last else scale.detach(), valid,
                                   teacher_all)
            if j == 0 and not self._finite(loss):  # every pass holds the whole batch's loss: one check
                return float("nan"), acc
            self.engine.backward(loss, last=last)
        return loss.item(), acc

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether every worker's loss is finite (one all-reduce): a step is skipped by all alike,
        before any backward, so no worker waits in a collective the others never enter."""
        ranks = self.faults.get("nonfinite", {}).get(self.position.global_step + 1, ())
        if self.rank in ranks:
            loss = loss * float("nan")
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], dtype=torch.float32)
        if self.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _loss(self, image_features, text_features, scale, valid, teacher):
        config = self.config
        return contrastive(image_features.float(), text_features.float(), scale.float(), valid,
                           aggregate=not config.skip_aggregate and self.world_size > 1,
                           with_grad=config.gather_with_grad, teacher_features=teacher,
                           kd_weight=config.kd_loss_weight)

    def _teacher_features(self, images):
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher.encode_image(images).float()

    def _to_device(self, batch: dict[str, np.ndarray]):
        for row in np.flatnonzero(~batch["valid"]):
            self.bad_records.append(str(batch["error"][row]))
        return tuple(torch.tensor(batch[key], device=self.device) for key in ("image", "tokens", "valid"))

    def _count_nonfinite(self, loss: float) -> None:
        if math.isfinite(loss):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        step = self.position.global_step
        self.logger.warning(f"step {step}: the loss is not finite on a worker; the step is skipped on every worker "
                            f"({self.bad_steps} in a row, {self.skipped_steps} in all)")
        if self.bad_steps >= self.config.max_bad_steps:
            raise NonFiniteTraining(
                f"{self.bad_steps} steps in a row up to step {step} had a non-finite loss (--max-bad-steps "
                f"{self.config.max_bad_steps}); the last good checkpoint is "
                f"{self.last_checkpoint or 'none (no checkpoint was saved)'}; lower --lr or raise --warmup, then --resume "
                f"from it")

    def _after_step(self, epoch, loss, acc, data_time, batch_time, micro) -> None:
        config, step = self.config, self.position.global_step
        with self.engine.gathered([self.engine.module.logit_scale]):
            logit_scale = self.engine.module.logit_scale.item()
        metrics = {"step": step, "epoch": epoch + 1, "loss": loss, "i2t_acc": acc["i2t"], "t2i_acc": acc["t2i"],
                   "lr": self.engine.lr, "logit_scale": logit_scale, "data_time": data_time,
                   "batch_time": batch_time, "samples_per_s": config.global_batch_size / max(batch_time, 1e-9),
                   "skipped_steps": self.skipped_steps}
        if config.record_sample_ids:
            self.logger.record_samples(step, gather_indices(micro))
        if step % config.log_interval == 0 or step == self.total_steps:
            self.logger.train_line(metrics, self.plan, self.total_steps)
        self.logger.metrics(metrics)
        if self._due(config.valid_step_interval, step):
            self.validate()
            self.engine.train(True)
        if config.save_step_frequency > 0 and step % config.save_step_frequency == 0:
            self.save(epoch_end=None, step_file=True)

    @staticmethod
    def _due(interval: int | None, count: int) -> bool:
        return bool(interval) and count % interval == 0

    # ------------------------------------------------------------ validation
    def validate(self) -> dict[str, float] | None:
        if not self.config.val_data:
            return None
        result = self._validate()
        if self.ema is not None:
            with self.ema.applied(self.engine.module):
                averaged = self._validate(log_line=False)
            result.update({f"ema_{key}": value for key, value in averaged.items() if key != "step"})
            self.logger.info("EMA weights: " + " | ".join(f"{key}: {value:.4f}" for key, value in averaged.items()
                                                          if key != "step"))
        self.last_validation = result
        return result

    def zero_shot(self) -> None:
        """--zeroshot-data: top-1/5 of the weights as they are now (every worker, its share)."""
        if self.zeroshot is None:
            return
        self.engine.train(False)
        result = self.zeroshot.evaluate(self.engine.module)
        self.engine.train(True)
        self.logger.zeroshot_line(result, self.position)
        self.last_validation = {**self.last_validation, **result}
        self._zeroshot_step = self.position.global_step

    def _validate(self, log_line: bool = True) -> dict[str, float]:
        config = self.config
        self.engine.train(False)
        indices = validation_indices(len(self.val_pairs), config.valid_batch_size, self.world_size, self.rank,
                                     config.seed)
        decoder = SampleDecoder(self.engine.module.image_size, config.context_length)
        sums, seen = torch.zeros(4, dtype=torch.float64), {}
        with torch.no_grad():
            for batch in stream_batches(self.val_pairs, decoder, indices, config.valid_batch_size,
                                        config.valid_num_workers):
                images, tokens, valid = self._to_device(batch)
                image_features, text_features, scale = self.engine.forward(images, tokens)
                loss, acc = contrastive(image_features.float(), text_features.float(), scale.float(), valid,
                                        aggregate=False, with_grad=False)
                n = int(valid.sum())
                sums += torch.tensor([loss.item() * n, acc["i2t"] * n, acc["t2i"] * n, n], dtype=torch.float64)
                for i in np.flatnonzero(batch["valid"]):
                    seen[int(batch["index"][i])] = (int(batch["image_id"][i]), int(batch["text_id"][i]),
                                                    image_features[i].float().cpu(), text_features[i].float().cpu())
        if self.world_size > 1:
            dist.all_reduce(sums)
        result = {"valid_loss": sums[0].item() / sums[3].item(), "valid_i2t_acc": sums[1].item() / sums[3].item(),
                  "valid_t2i_acc": sums[2].item() / sums[3].item()}
        result.update(retrieval_recall(gather_objects(seen)), step=self.position.global_step)
        if log_line:
            self.logger.validation_line(result, self.position, self.engine.module, config.valid_batch_size)
        return result

    # ------------------------------------------------------------ checkpoints
    def save(self, epoch_end: int | None, step_file: bool = False, final: bool = False) -> None:
        """Ray Train checkpoint (every worker: its optimizer shard) plus cn_clip-layout
        files from rank 0, at cn_clip's save points."""
        import ray.train

        config = self.config
        raw_state = self.engine.model_state()
        model_state = lora.merged_state(raw_state, config.lora_alpha / config.lora_rank) if config.lora_rank \
            else raw_state
        metrics = {"step": self.position.global_step, "epoch": self.position.epoch,
                   **self.last_validation}
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            self.engine.save(directory)
            if self.rank == 0:
                checkpoints.write_ray_checkpoint(directory, self.engine.module, model_state, self.position)
                if config.lora_rank:  # the adapter on its own, in the Ray checkpoint and beside epoch_latest.pt
                    for folder in (directory / lora.ADAPTER_DIR, config.checkpoint_dir / "epoch_latest.lora"):
                        lora.save_adapter(folder, raw_state, config.lora_rank, config.lora_alpha,
                                          self.engine.module.lora_targets)
                if self.ema is not None:
                    torch.save(self.ema.state_dict(), directory / checkpoints.EMA_FILE)
                    with self.ema.applied(self.engine.module):
                        ema_state = self.engine.model_state()
                    if config.lora_rank:
                        ema_state = lora.merged_state(ema_state, config.lora_alpha / config.lora_rank)
                    checkpoints.write_ema_file(self.config, ema_state, self.position)
                checkpoints.write_cn_clip_files(self.config, model_state, self.position, epoch_end, step_file,
                                                final, self.engine.optimizer_state_for_cn_clip())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self._saved_step = self.position.global_step
        if self.bad_steps == 0:
            self.last_checkpoint = str(self.config.checkpoint_dir / "epoch_latest.pt")


def worker_node() -> dict:
    import ray

    context = ray.get_runtime_context()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"node_id": context.get_node_id(), "host": socket.gethostname(), "device": device}


def gather_indices(micro: list[dict[str, np.ndarray]]) -> list[int]:
    local = [int(i) for batch in micro for i in batch["index"]]
    return [i for part in gather_objects(local, merge=False) for i in part]


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


def retrieval_recall(samples: dict[int, tuple]) -> dict[str, float]:
    """Text->image and image->text R@1/5/10 over the unique validation texts and images."""
    texts, images = {}, {}
    for image_id, text_id, image_feature, text_feature in samples.values():
        texts.setdefault(text_id, [text_feature, set()])[1].add(image_id)
        images.setdefault(image_id, [image_feature, set()])[1].add(text_id)
    text_ids, image_ids = list(texts), list(images)
    scores = torch.stack([texts[t][0] for t in text_ids]) @ torch.stack([images[i][0] for i in image_ids]).t()
    result = {}
    for name, matrix, rows, cols, truth in (("t2i", scores, text_ids, image_ids, texts),
                                            ("i2t", scores.t(), image_ids, text_ids, images)):
        top = matrix.topk(min(10, len(cols)), dim=1).indices
        for k in (1, 5, 10):
            hits = [bool(truth[row][1] & {cols[j] for j in top[r, :k].tolist()}) for r, row in enumerate(rows)]
            result[f"valid_{name}_r{k}"] = 100.0 * sum(hits) / len(hits)
    # clip-pytorch's report names: "Text R Mean" retrieves texts (i2t), "Image R Mean" images (t2i)
    result["valid_text_r_mean"] = sum(result[f"valid_i2t_r{k}"] for k in (1, 5, 10)) / 3
    result["valid_image_r_mean"] = sum(result[f"valid_t2i_r{k}"] for k in (1, 5, 10)) / 3
    result["valid_mean_recall"] = (result["valid_text_r_mean"] + result["valid_image_r_mean"]) / 2
    return result


class RunMismatch(ValueError):
    """A run started again under its name with settings its checkpoint cannot continue."""


class NonFiniteTraining(ValueError):
    """The loss stayed non-finite for --max-bad-steps steps: the run stops (a user's matter:
    learning rate, data, precision), naming the step and the last good checkpoint."""


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point Ray Train runs on every worker."""
    trainer = Trainer(loop_config["config"], loop_config.get("faults"))
    trainer.fit()
