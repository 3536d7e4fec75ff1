"""Training data: each worker streams its part of the sample plan through the data plane.

The plan (plan.py) fixes which pair indices a worker consumes. `open_pairs` gives
random access to the dataset (a cn_clip LMDB split, a clip-pytorch caption JSON,
or webdataset shards) and `PlannedPairsDatasource` reads the plan's index blocks in
Ray read tasks anywhere in the cluster; `SampleDecoder` decodes and transforms them
in the same tasks with the data plane's `decode_batch`, and the stream comes back in plan order
(preserve_order), so training is exactly reproducible and resumable. Bad records keep
their slot with `valid=False` (shapes stay static for all_gather) and are excluded
from the loss and counted; `to_device` puts a decoded micro-batch on the worker's device.
"""
from __future__ import annotations

import numpy as np
import torch

import clip_models

from ..data import PlannedPairsDatasource, count_pairs, decode_batch, open_pairs

BLOCKS_PER_EPOCH = 64  # index blocks per epoch and rank: enough tasks to spread decoding
DECODE_CPUS = 0.5  # CPUs per read + decode task

__all__ = ["BLOCKS_PER_EPOCH", "DECODE_CPUS", "SampleDecoder", "count_pairs", "open_pairs", "stream_batches",
           "to_device"]


class SampleDecoder:
    """map_batches callable: planned pair rows -> uint8 image pixels, token ids, ids, validity."""

    def __init__(self, image_size: int, context_length: int, use_augment: bool = False):
        self.image_size = image_size
        self.context_length = context_length
        self.use_augment = use_augment
        self._post_init()

    def _post_init(self):
        self._transform = clip_models.train_transform(self.image_size, self.use_augment, pixels=True)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_transform"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._post_init()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        read_ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        out, bad = decode_batch({"image": batch["image"], "text": batch["text"], "image_id": batch["image_id"]},
                                self._transform, self.context_length, ("image_id",), todo=read_ok)
        errors = np.asarray(batch["error"], dtype=object).copy()
        for row, record in bad.items():
            errors[row] = str(record)
        return {"index": np.asarray(batch["index"], np.int64), "image_id": np.asarray(batch["image_id"], np.int64),
                "text_id": np.asarray(batch["text_id"], np.int64), "valid": out["valid"], "error": errors,
                "image": out["image"], "tokens": out["tokens"]}


def stream_batches(pairs, decoder: SampleDecoder, indices: np.ndarray, batch_size: int, concurrency: int):
    """Yield decoded micro-batches (dicts of numpy arrays) for `indices` of `pairs`, in order."""
    import ray.data

    if len(indices) == 0:
        return
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the plan's order is the training order
    context.enable_progress_bars = False
    num_blocks = min(BLOCKS_PER_EPOCH, max(1, len(indices) // batch_size))
    source = PlannedPairsDatasource(pairs, np.array_split(indices.astype(np.int64), num_blocks), decoder, batch_size)
    # One read task per plan block: a larger parallelism would only make Ray split the blocks.
    dataset = ray.data.read_datasource(source, override_num_blocks=num_blocks, concurrency=concurrency,
                                       num_cpus=DECODE_CPUS)
    yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False)


def to_device(batch: dict[str, np.ndarray], device: torch.device, bad_records: list[str]):
    """(images, tokens, valid) of a decoded micro-batch as tensors on `device`; the errors of
    its bad records are appended to `bad_records`."""
    for row in np.flatnonzero(~batch["valid"]):
        bad_records.append(str(batch["error"][row]))
    return tuple(torch.tensor(batch[key], device=device) for key in ("image", "tokens", "valid"))
