"""The run's log on rank 0: cn_clip's line format on the console and in
{logs}/{name}/out_<time>.log, the params file, metrics.jsonl (and the trackers it feeds),
sample_ids.jsonl (--record-sample-ids) and workers.json."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from ..io import write_json
from .config import TrainConfig

log = logging.getLogger("clip_platform.train")


class RunLogger:
    """Writes only on rank 0: console + {logs}/{name}/out_<time>.log, metrics.jsonl,
    and (with --record-sample-ids) sample_ids.jsonl."""

    def __init__(self, config: TrainConfig, rank: int):
        self.config = config
        self.enabled = rank == 0
        if not self.enabled:
            return
        config.run_dir.mkdir(parents=True, exist_ok=True)
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime())
        handler = logging.FileHandler(config.run_dir / f"out_{stamp}.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d,%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG if config.debug else logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in log.handlers):
            console = logging.StreamHandler()
            console.setFormatter(handler.formatter)
            log.addHandler(console)
        log.propagate = False
        self._params_file = config.run_dir / f"params_{stamp}.txt"
        from .trackers import Trackers

        self.trackers = Trackers(config)

    def info(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def warning(self, message: str) -> None:
        if self.enabled:
            log.warning(message)

    def log_params(self, plan, total_steps: int) -> None:
        if not self.enabled:
            return
        params = dataclasses.asdict(self.config) | {"max_steps_resolved": total_steps,
                                                     "steps_per_epoch": plan.steps_per_epoch,
                                                     "num_samples": plan.num_samples,
                                                     "world_size": plan.world_size}
        self._params_file.write_text("".join(f"{k}: {params[k]}\n" for k in sorted(params)), encoding="utf-8")
        log.info("Params:\n" + "".join(f"  {k}: {params[k]}\n" for k in sorted(params)))

    def train_line(self, m: dict, plan, total_steps: int) -> None:
        if not self.enabled:
            return
        cfg = self.config
        batch = cfg.batch_size * cfg.accum_freq
        step_in_epoch = (m["step"] - 1) % plan.steps_per_epoch + 1
        done = step_in_epoch * batch * plan.world_size
        samples = plan.steps_per_epoch * batch * plan.world_size
        acc = (f"Image2Text Acc: {m['i2t_acc'] * 100:.2f} | Text2Image Acc: {m['t2i_acc'] * 100:.2f} | "
               if cfg.report_training_batch_acc else "")
        log.info(f"Global Steps: {m['step']}/{total_steps} | Train Epoch: {m['epoch']} [{done}/{samples} "
                 f"({100.0 * step_in_epoch / plan.steps_per_epoch:.0f}%)] | Loss: {m['loss']:.6f} | "
                 + (f"Distillation Loss: {m['kd_loss']:.6f} | " if "kd_loss" in m else "") + f"{acc}"
                 f"Data Time: {m['data_time']:.3f}s | Batch Time: {m['batch_time']:.3f}s | LR: {m['lr']:5f} | "
                 f"logit_scale: {m['logit_scale']:.3f} | Global Batch Size: {batch * plan.world_size}")

    def validation_line(self, r: dict, position, model, batch_size: int) -> None:
        if not self.enabled:
            return
        log.info(f"Validation Result (epoch {position.epoch + (1 if position.step_in_epoch else 0)} @ "
                 f"{position.global_step} steps) | Valid Loss: {r['valid_loss']:.6f} | "
                 f"Image2Text Acc: {r['valid_i2t_acc'] * 100:.2f} | Text2Image Acc: {r['valid_t2i_acc'] * 100:.2f} | "
                 f"logit_scale: {model.logit_scale.item():.3f} | Valid Batch Size: {batch_size}")
        log.info("Validation Recall | " + " | ".join(f"{k[6:]}: {v:.2f}" for k, v in r.items()
                                                     if "_r" in k or k.endswith("mean_recall")))
        self._append("metrics.jsonl", {"step": position.global_step, **r})

    def worker_nodes(self, nodes: list[dict]) -> None:
        """Where each rank runs ({run}/workers.json): placement is visible after the fact."""
        if self.enabled:
            write_json(self.config.run_dir / "workers.json", nodes, indent=1)
            log.info(f"{len(nodes)} workers on {len({n['node_id'] for n in nodes})} node(s)")

    def metrics(self, m: dict) -> None:
        if self.enabled:
            self._append("metrics.jsonl", m)

    def record_samples(self, step: int, indices: list[int]) -> None:
        if self.enabled:
            self._append("sample_ids.jsonl", {"step": step, "indices": indices})

    def zeroshot_line(self, r: dict, position) -> None:
        if not self.enabled:
            return
        log.info(f"Zero-shot (epoch {position.epoch + (1 if position.step_in_epoch else 0)} @ {position.global_step} "
                 f"steps) | {Path(self.config.zeroshot_data).name} top-1: {r['zeroshot_top1']:.2f} | "
                 f"top-5: {r['zeroshot_top5']:.2f}" + (f" | {r['zeroshot_skipped']} unreadable images skipped"
                                                      if r["zeroshot_skipped"] else ""))
        self._append("metrics.jsonl", {"step": position.global_step, **r})

    def finish(self, bad_records: list[str]) -> None:
        if self.enabled and bad_records:
            log.warning(f"{len(bad_records)} bad training records skipped (this worker's), e.g.: "
                        + "; ".join(bad_records[:5]))
        if self.enabled:
            self.trackers.close()

    def _append(self, name: str, record: dict) -> None:
        with open(self.config.run_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if name == "metrics.jsonl":
            self.trackers.log(record)
