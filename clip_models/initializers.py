"""Random initialisation that costs nothing when the model is built to receive a
checkpoint's weights (on the meta device): there torch's normal_ and arithmetic go
through its reference ops, whose first call imports torch._dynamo (~1.5 s)."""
from __future__ import annotations

import torch
from torch import nn


def init_normal_(tensor: torch.Tensor, std: float) -> None:
    """nn.init.normal_(tensor, std=std), skipped on the meta device."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, std=std)


def normal_parameter(*shape: int, std: float) -> nn.Parameter:
    """A parameter drawn from N(0, std^2) (left empty on the meta device)."""
    param = nn.Parameter(torch.empty(*shape))
    init_normal_(param, std)
    return param


def uninitialised_embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """nn.Embedding without its own random draw (its reset runs normal_ even on the
    meta device): the owner initialises it."""
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=torch.empty(num, dim))
