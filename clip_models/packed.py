"""bf16 inference on CPU with the linear layers' weights pre-packed for oneDNN.

Under bf16 autocast every `F.linear` casts its fp32 weight to bf16 and lets oneDNN
re-lay it out, on every call. `PackedLinears` does both once: within it, `F.linear`
on one of the module's weights (nn.Linear, the ViT's fused in_proj) runs
`mkldnn._linear_pointwise` on a bf16 copy in oneDNN's blocked layout, what
`torch.compile` with frozen weights does, without compiling. Output as autocast's:
bf16, from bf16 inputs with fp32 accumulation. Measured on 2 cores (RoBERTa-base
text tower, batches of 64): 1.21x the texts/s of plain autocast. The oneDNN ops are
private torch APIs, reached through `_torch_compat` (which falls back to autocast's
own F.linear when they are missing).

The weights are copied when it is built: a model trained afterwards needs a new one.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._torch_compat import PackedLinearOps, packed_linear_ops

_WEIGHTS = ("weight", "in_proj_weight")  # nn.Linear, the ViT's fused attention projection


class PackedLinears(TorchFunctionMode):
    """A context (re-enterable) in which `module`'s linear layers run on packed bf16 weights:
    for use inside bf16 autocast (its output is bf16 whatever the input)."""

    def __init__(self, module: nn.Module, ops: PackedLinearOps):
        super().__init__()
        self.ops = ops
        # id of each fp32 weight -> (the weight, kept so its id stays its own; its packed bf16 copy)
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in module.modules():
            for name in _WEIGHTS:
                weight = getattr(layer, name, None)
                if isinstance(weight, nn.Parameter) and weight.dim() == 2 and \
                        (isinstance(layer, nn.Linear) or name == "in_proj_weight"):
                    with torch.no_grad():
                        packed = ops.pack(weight.detach().bfloat16())
                    self.packed[id(weight)] = (weight, packed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            input, weight, bias = _linear_args(*args, **kwargs)
            original, packed = self.packed.get(id(weight), (None, None))
            if original is weight:
                return self.ops.linear(input, packed, bias)
        return func(*args, **kwargs)


def _linear_args(input, weight, bias=None):
    return input, weight, bias


def packed_linears(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None):
    """PackedLinears(module) for bf16 inference on a CPU that supports it (and a torch whose
    private oneDNN ops `_torch_compat` finds), else a no-op context: autocast's own linears."""
    ops = packed_linear_ops(device) if dtype == torch.bfloat16 else None
    return PackedLinears(module, ops) if ops is not None else contextlib.nullcontext()
