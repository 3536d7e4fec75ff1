"""The sample plan: which pair each worker trains on at each step, and the `Position` in it
that a run saves and resumes from.

The order is cn_clip's: the split is padded with its first samples to a multiple
of the per-micro-batch global size (batch x workers), permuted with
torch.randperm seeded by seed + epoch (DistributedSampler), and rank r takes
every W-th index (indices[r::W]) in batches of `batch_size`. Because the plan is
a pure function of (seed, epoch, position), a resumed run continues mid-epoch
with no sample skipped or repeated, and W workers x batch b see exactly the
global batches of 1 worker x batch W*b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Position:
    """Where training stands: the next step to run."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class Plan:
    num_samples: int  # pairs in the split
    batch_size: int  # per worker, per micro-batch
    world_size: int  # training workers
    accum_freq: int = 1  # micro-batches per optimizer step
    seed: int = 123

    def __post_init__(self):
        if self.num_samples < self.batch_size * self.world_size * self.accum_freq:
            raise ValueError(
                f"the training split has {self.num_samples} pairs, fewer than one global batch "
                f"({self.batch_size} per worker x {self.world_size} workers x accum {self.accum_freq}); "
                "use a smaller --batch-size or more data")

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / (self.batch_size * self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; a trailing partial accumulation is dropped, as cn_clip."""
        return self.micro_batches_per_epoch // self.accum_freq

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The padded, permuted pair indices of one epoch, all ranks interleaved."""
        padded = self.micro_batches_per_epoch * self.batch_size * self.world_size
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return (torch.randperm(padded, generator=generator) % self.num_samples).numpy()

    def rank_indices(self, epoch: int, rank: int, start_step: int = 0) -> np.ndarray:
        """Pair indices rank `rank` consumes in `epoch` from optimizer step `start_step`,
        `batch_size` per micro-batch, for whole steps only."""
        order = self.epoch_order(epoch)[rank::self.world_size]
        per_step = self.batch_size * self.accum_freq
        return order[start_step * per_step: self.steps_per_epoch * per_step]


def validation_indices(num_samples: int, batch_size: int, world_size: int, rank: int, seed: int) -> np.ndarray:
    """cn_clip validates on a seeded shuffle (epoch 0), padded to whole global batches."""
    plan = Plan(max(num_samples, batch_size * world_size), batch_size, world_size, 1, seed)
    order = plan.epoch_order(0) % num_samples
    return order[rank::world_size]
