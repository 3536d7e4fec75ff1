"""`make demo`: the platform end to end on an embedded local Ray, from configs/demo.yaml."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_io



@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "demo_output"  # everything the demo writes goes here
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticConfig fields
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")


def make_data(config: DemoConfig) -> Path:
    from .data import SyntheticConfig, make_synthetic

    out = Path(config.output_dir) / "data"
    if (out / "lmdb" / "valid" / "pairs").is_dir():
        print(f"[1/2] synthetic dataset: reusing {out}")
        return out
    make_synthetic(config_io.build(SyntheticConfig, {"lmdb": True, **config.synthetic}, {"output_dir": str(out)}))
    print(f"[1/2] synthetic dataset written to {out}")
    return out


def finetune(config: DemoConfig, data: Path):
    from .train import TrainConfig, run_finetune

    paths = {"train_data": str(data / "lmdb" / "train"), "val_data": str(data / "lmdb" / "valid"),
             "logs": str(Path(config.output_dir) / "logs")}
    result = run_finetune(config_io.build(TrainConfig, config.finetune, paths))
    m = result.final_metrics
    print(f"[2/2] finetuned: validation text→image R@1 {m.get('valid_t2i_r1', float('nan')):.1f}  "
          f"R@5 {m.get('valid_t2i_r5', float('nan')):.1f}  image→text R@1 {m.get('valid_i2t_r1', float('nan')):.1f}  "
          f"mean recall {m.get('valid_mean_recall', float('nan')):.1f}")
    print(f"      checkpoint (cn_clip layout): {result.checkpoint}\n      curves: {result.plot}\n"
          f"      logs: {result.run_dir}")
    return result


def run_demo(config: DemoConfig) -> dict[str, float]:
    timings: dict[str, float] = {}

    def timed(name, stage, *args):
        start = time.perf_counter()
        out = stage(*args)
        timings[name] = time.perf_counter() - start
        return out

    data = timed("data", make_data, config)
    timed("finetune", finetune, config, data)
    print("\nDemo finished: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return timings
