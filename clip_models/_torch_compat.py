"""torch's private APIs, behind one seam: the only module that touches them.

Two speed-ups rely on torch internals that may change in any release:

* oneDNN bf16 linears on pre-packed weights (`torch.ops.mkldnn._reorder_linear_weight`,
  `_linear_pointwise`, `_is_mkldnn_bf16_supported`), used by `clip_models.packed`;
  fallback: bf16 autocast's own `F.linear` (same results, ~1.2x slower on CPU).
* inductor's weight freezing (`torch._inductor.config.patch(freezing=True)`), used by the
  platform's compiled CPU image encoders; fallback: eager encoding (what a node without
  a C++ compiler already gets).

Each is used only on a torch within `TESTED` (major, minor) and when the private name
resolves; otherwise the caller gets None, takes the fallback, and one warning per
feature says why, so a torch upgrade shows up here, in one log line, not as a crash
deep in a forward pass. Retest and widen `TESTED` after upgrading torch.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
TESTED = ((2, 13), (2, 13))  # inclusive (major, minor) range of torch these private APIs were tested on
_warned: set[str] = set()


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch ("2.13.0+cpu" -> (2, 13))."""
    major, minor = (re.match(r"\d+", part).group() for part in torch.__version__.split(".")[:2])
    return int(major), int(minor)


def supported() -> bool:
    """Whether the running torch is in the range whose private APIs were tested."""
    return TESTED[0] <= torch_version() <= TESTED[1]


def _warn_once(feature: str, reason: str, fallback: str) -> None:
    if feature not in _warned:
        _warned.add(feature)
        log.warning("%s unavailable (%s): using %s instead", feature, reason, fallback)


def _private(feature: str, fallback: str, resolve: Callable):
    """resolve() -> the private objects, or None (with one warning) on an untested torch or
    when a private name no longer resolves."""
    if not supported():
        tested = " to ".join(f"{a}.{b}" for a, b in dict.fromkeys(TESTED))
        _warn_once(feature, f"torch {torch.__version__} is not the tested {tested}", fallback)
        return None
    try:
        return resolve()
    except (AttributeError, ImportError, RuntimeError) as exc:
        _warn_once(feature, f"torch {torch.__version__}: {type(exc).__name__}: {exc}", fallback)
        return None


# ---------------------------------------------------------------- oneDNN packed linears

@dataclass(frozen=True)
class PackedLinearOps:
    """oneDNN's bf16 linear on weights packed once into its blocked layout."""

    pack: Callable[[torch.Tensor], torch.Tensor]  # bf16 weight [out, in] -> packed weight
    pointwise: Callable  # mkldnn._linear_pointwise(input, packed, bias, attr, scalars, algorithm)

    def linear(self, input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """bf16 `F.linear(input, weight, bias)` on `pack(weight)`: bf16 out, fp32 accumulation."""
        return self.pointwise(input.to(torch.bfloat16), packed, None if bias is None else bias.to(torch.bfloat16),
                              "none", [], "")


def _mkldnn_ops():
    ops = torch.ops.mkldnn
    return ops._is_mkldnn_bf16_supported, ops._reorder_linear_weight, ops._linear_pointwise


def packed_linear_ops(device: torch.device | str) -> PackedLinearOps | None:
    """The packed bf16 linear ops for `device`, or None: not a CPU, no oneDNN bf16 on this CPU
    (e.g. no AVX512-BF16 or AMX), or the private ops are missing (warned once)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    ops = _private("oneDNN packed bf16 linears", "bf16 autocast's F.linear", _mkldnn_ops)
    if ops is None or not ops[0]():
        return None
    return PackedLinearOps(ops[1], ops[2])


# ---------------------------------------------------------------- inductor freezing

def _freezing_patch():
    import torch._inductor.config as inductor

    if not hasattr(inductor, "freezing"):
        raise AttributeError("torch._inductor.config has no 'freezing'")
    return inductor.patch


def inductor_freezing() -> Callable[[], contextlib.AbstractContextManager] | None:
    """A factory of contexts in which inductor compiles with frozen weights (constants, on
    CPU pre-packed for oneDNN), or None when that config is missing (warned once)."""
    patch = _private("inductor weight freezing", "eager encoding (no torch.compile)", _freezing_patch)
    return None if patch is None else (lambda: patch(freezing=True))
