"""LoRA finetuning with peft (--lora-rank R --lora-alpha A --lora-targets ...).

peft's `inject_adapter_in_model` wraps the targeted nn.Linear layers of the CLIP model in
place (the model stays a `clip_models.CLIP`, so the training step, DeepSpeed and the
checkpoint code see the same module), and leaves only the adapters trainable.

Every checkpoint holds the *merged* weights (W + alpha/r * B @ A) under the model's own key
names, so cn_clip and `clip_models.load` read a LoRA run's files like any other; the adapter
is saved on its own too, in peft's layout (`adapter_config.json` + `adapter_model.safetensors`,
keys as `PeftModel.save_pretrained` writes them), so `peft.PeftModel.from_pretrained(base,
DIR)` puts it back on the base model.

Targets are module-name suffixes. The defaults are every linear layer of the transformer
blocks that peft can wrap: BERT's query/key/value and dense layers, the ViT's attention output
and MLP (its q/k/v sit in one fused `in_proj_weight` parameter, not a layer), and RN50's
attention pool. `query,key,value,dense` adapts the text tower alone, `out_proj,c_fc,c_proj`
the vision tower alone.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("query", "key", "value", "dense", "out_proj", "c_fc", "c_proj", "q_proj", "k_proj", "v_proj")
ADAPTER = "default"  # peft's adapter name inside the model's keys
BASE = ".base_layer."  # peft keeps a wrapped layer's own weights under this name
PEFT_PREFIX = "base_model.model."  # key prefix of PeftModel.save_pretrained's files
ADAPTER_DIR = "lora"  # in Ray Train checkpoints; epoch_latest.lora/ beside epoch_latest.pt


def targets(spec: str, model: nn.Module) -> tuple[str, ...]:
    """--lora-targets: a comma list of linear-layer names, each of which `model` must have;
    empty: those of DEFAULT_TARGETS the model has."""
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    missing = [name for name in names if name not in linear]
    if missing:
        raise ValueError(f"--lora-targets {','.join(missing)}: no linear layer of the model is named so "
                         f"(its linear layers: {','.join(sorted(linear))})")
    return names or tuple(name for name in DEFAULT_TARGETS if name in linear)


def lora_config(rank: int, alpha: float, target_names: tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_names), lora_dropout=0.0, bias="none")


def add_lora(model: nn.Module, rank: int, alpha: float, spec: str = "") -> tuple[str, ...]:
    """Wrap the layers --lora-targets `spec` names (see `targets`) in LoRA adapters, in place;
    only the adapters train. Returns the target names."""
    from peft import inject_adapter_in_model

    names = targets(spec, model)
    inject_adapter_in_model(lora_config(rank, alpha, names), model, adapter_name=ADAPTER)
    return names


def has_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in key for key in state)


def merged_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The model's own state dict, adapters merged: W + scaling * B @ A for every wrapped layer,
    under the key names the model has without LoRA (float32 math, as peft's merge)."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if BASE not in key:
            merged[key] = value
            continue
        layer, _, name = key.partition(BASE)
        if name == "weight":
            a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[f"{layer}.{name}"] = value
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters alone, keyed as PeftModel.save_pretrained writes them."""
    return {PEFT_PREFIX + key.replace(f".{ADAPTER}.", "."): value.contiguous() for key, value in state.items()
            if ".lora_" in key}


def to_wrapped_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain checkpoint's state (e.g. --resume) under the keys of `model` with LoRA layers:
    a wrapped layer's weight and bias move under base_layer; adapters are left as they are."""
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        layer, _, name = key.rpartition(".")
        wrapped = f"{layer}{BASE}{name}"
        out[wrapped if key not in own and wrapped in own else key] = value
    return out


def save_adapter(directory: Path, state: dict[str, torch.Tensor], rank: int, alpha: float,
                 target_names: tuple[str, ...]) -> Path:
    """Write the adapter in peft's layout into `directory`, replacing it whole (written beside
    it, then renamed: a reader never sees half an adapter)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = lora_config(rank, alpha, target_names)
    config.save_pretrained(str(tmp))
    save_file(adapter_state(state), str(tmp / "adapter_model.safetensors"))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_adapter(model: nn.Module, directory: Path) -> None:
    """Put a saved adapter's weights back into `model` (already wrapped with the same targets)."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
    own = model.state_dict()
    state = {}
    for key, value in saved.items():
        layer, _, name = key.removeprefix(PEFT_PREFIX).rpartition(".")  # ...lora_A + weight
        target = f"{layer}.{ADAPTER}.{name}"
        if target not in own:
            raise ValueError(f"{directory}: adapter weight {key} has no place in the model (other --lora-targets?)")
        state[target] = value
    missing = [key for key in own if ".lora_" in key and key not in state]
    if missing:
        raise ValueError(f"{directory}: the adapter lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)


def trainable_summary(model: nn.Module) -> str:
    # Under ZeRO-3 each rank holds an empty placeholder per parameter; ds_numel is its full size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return f"{trained:,} of {total:,} parameters train ({100.0 * trained / max(total, 1):.2f}%)"
