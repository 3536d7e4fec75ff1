"""Inference precision of the batch jobs: amp and fp32 compute in fp32 (cn_clip's
--precision amp is fp32 on CPU and for its feature extraction), bf16 and fp16 under
autocast; on CPUs with oneDNN bf16, bf16 linears run on pre-packed weights."""
from __future__ import annotations

import torch
from torch import nn

from clip_models.packed import packed_linears

PRECISIONS = ("amp", "fp32", "bf16", "fp16")  # --precision of every job, finetuning included
# --precision of embed, zero-shot and Serve: also int8, the ONNX backends' int8 graphs on CPUs
ENCODER_PRECISIONS = (*PRECISIONS, "int8")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    if precision in _AUTOCAST:
        return torch.autocast(device.type, dtype=_AUTOCAST[precision])
    return torch.autocast(device.type, enabled=False)


def fast_linears(module: nn.Module, precision: str, device: torch.device):
    """A context for `module`'s forward passes under `autocast(precision, device)`: its
    linear layers on packed bf16 weights where that applies (bf16 on a CPU with oneDNN
    bf16; the results are autocast's), else a no-op. Build it once per loaded model."""
    return packed_linears(module, device, _AUTOCAST.get(precision))
