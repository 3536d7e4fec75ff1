"""The training step, on every Ray Train worker: `Trainer` (fit, epochs, the step with cn_clip's
feature-cache accumulation and distillation, the loss, the non-finite guard, the points where
validation, zero-shot and checkpoints are due) on the deterministic sample plan, and
`train_loop_per_worker`, the entry point Ray Train runs. Restore and save are
checkpoints.Checkpointer's, validation validation.Validation's, the log run_log.RunLogger's."""
from __future__ import annotations

import math
import random
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

import clip_models

from . import lora
from ..ray_context import Gauges
from .checkpoints import Checkpointer
from .config import TrainConfig
from .data import SampleDecoder, open_pairs, stream_batches, to_device
from .ema import EMA
from .engine import Engine, gather_objects, select_device, world
from .objective import contrastive
from .plan import Plan, Position
from .run_log import RunLogger
from .validation import Validation
from .zeroshot import ZeroShotEval

TRAIN_GAUGES = {"step": "steps done", "epoch": "epoch of the last step, from 1", "loss": "training loss",
                "kd_loss": "distillation term", "i2t_acc": "in-batch image-to-text accuracy",
                "t2i_acc": "in-batch text-to-image accuracy", "lr": "learning rate",
                "samples_per_s": "training samples per second", "skipped_steps": "non-finite steps skipped",
                "valid_loss": "validation loss", "valid_mean_recall": "validation mean recall (%)",
                "valid_t2i_r1": "validation text-to-image R@1 (%)", "valid_i2t_r1": "validation image-to-text R@1 (%)",
                "zeroshot_top1": "zero-shot top-1", "zeroshot_top5": "zero-shot top-5"}


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

    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.world_size = world()
        seed_everything(config.seed)
        self.device = select_device(config)
        self.train_pairs = open_pairs(config.train_data)
        self.plan = Plan(len(self.train_pairs), config.batch_size, self.world_size, config.accum_freq,
                         config.seed)
        self.total_steps, self.max_epochs = self._schedule_length()
        self.engine = Engine(build_model(config), config, self.device)
        self.ema = None  # made from the weights the run starts with (after the restore)
        self.teacher = load_teacher(config, self.device)
        self.zeroshot = ZeroShotEval(config.zeroshot_data, self.rank, self.world_size, config.valid_batch_size,
                                     config.context_length) if config.zeroshot_data else None
        self._zeroshot_step = -1
        self._saved_step = -1
        self.last_validation: dict = {}
        self.bad_records: list[str] = []
        self.bad_steps = self.skipped_steps = 0  # non-finite steps: in a row, and in all
        self.last_checkpoint: str | None = None
        self.logger = RunLogger(config, self.rank)
        self.gauges = Gauges("clip_train", TRAIN_GAUGES, run=config.name)  # rank 0's, per step
        self.logger.worker_nodes(gather_objects(worker_node(), merge=False))
        self.validation = Validation(config, self.engine, self.rank, self.world_size, self.logger) \
            if config.val_data else None
        self.checkpointer = Checkpointer(config, self.engine, self.rank, self.logger)
        self.position, saved_ema = self.checkpointer.restore()
        if config.ema_decay:
            self.ema = EMA(self.engine.module, config.ema_decay)
            if saved_ema is not None:  # a resumed run continues its average
                self.ema.load_state_dict(saved_ema)

    def _schedule_length(self) -> tuple[int, int]:
        steps = self.plan.steps_per_epoch
        if self.config.max_steps is not None:
            return self.config.max_steps, math.ceil(self.config.max_steps / steps)
        return steps * self.config.max_epochs, self.config.max_epochs

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
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], dtype=torch.float32)
        if self.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _loss(self, image_features, text_features, scale, valid, teacher):
        """The step's loss and accuracies: contrastive, plus distillation with a teacher. The
        one place a loss is made: the tests wrap it in a subclass to make it non-finite."""
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
        return to_device(batch, self.device, self.bad_records)

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
        if "kd_loss" in acc:  # --distillation: its term on its own, beside the total loss
            metrics["kd_loss"] = float(acc["kd_loss"])
        if self.rank == 0:
            self.gauges.set(**metrics)
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

    # ------------------------------------------------------------ evaluation and checkpoints
    def validate(self) -> dict[str, float] | None:
        if self.validation is None:
            return None
        self.last_validation = self.validation.run(self.position, self.ema, self.bad_records)
        if self.rank == 0:
            self.gauges.set(**self.last_validation)
        return self.last_validation

    def zero_shot(self) -> None:
        """--zeroshot-data: top-1/5 of the weights as they are now (every worker, its share)."""
        if self.zeroshot is None:
            return
        self.engine.train(False)
        result = self.zeroshot.evaluate(self.engine.module)
        self.engine.train(True)
        self.logger.zeroshot_line(result, self.position)
        self.last_validation = {**self.last_validation, **result}
        if self.rank == 0:
            self.gauges.set(**result)
        self._zeroshot_step = self.position.global_step

    def save(self, epoch_end: int | None, step_file: bool = False, final: bool = False) -> None:
        """A checkpoint at one of cn_clip's save points (checkpoints.Checkpointer.save), with the
        step's metrics and the last evaluation for Ray Train's result."""
        # The epoch of the last step, counted from 1 as the log and metrics.jsonl count it (the
        # position's epoch is the one the next step runs in, from 0).
        epoch = self.position.epoch + (1 if self.position.step_in_epoch else 0)
        metrics = {"step": self.position.global_step, "epoch": epoch, **self.last_validation}
        self.checkpointer.save(self.position, metrics, self.ema, epoch_end, step_file, final)
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


class NonFiniteTraining(ValueError):
    """The loss stayed non-finite for --max-bad-steps steps: the run stops (a user's matter:
    learning rate, data, precision), naming the step and the last good checkpoint."""


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point Ray Train runs on every worker: loop_config is {"config": TrainConfig}."""
    Trainer(loop_config["config"]).fit()
