"""Checkpoint I/O: read cn_clip `.pt`, plain state dicts, Hugging Face
`ChineseCLIPModel` directories and our own files; infer the architecture from
the weights; export to cn_clip and Hugging Face layouts."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from . import hf
from .config import (CLIPConfig, TextConfig, VisionConfig, config_from_struct, config_names, load_text_json,
                     load_vision_json)
from .errors import CheckpointError
from .hub import RELEASES, resolve
from .model import CLIP

log = logging.getLogger(__name__)
FORMAT = "clip_models"  # marks files written by save_checkpoint
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------- reading

def read_checkpoint(path: str | Path, mmap: bool = False,
                    meta: dict | None = None) -> tuple[dict[str, torch.Tensor], CLIPConfig | None, str]:
    """(state dict in cn_clip's key layout, config if the file records one, source kind).
    mmap: the tensors stay in the file, read only when touched: for a quick look at the
    config and shapes (the file must not be rewritten while they are in use).
    meta: a dict to fill with a training checkpoint's other top-level entries (cn_clip's
    epoch, step, optimizer; our data_position), so a resume reads the file once.
    A file that cannot be read as one raises CheckpointError naming it."""
    path = Path(path)
    try:
        return _read(path, mmap, meta)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, JSON and config errors of a damaged file or folder
        raise CheckpointError(f"{path} is not a checkpoint clip_models can read ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """An exception's first line, for a one-line error."""
    if isinstance(exc, KeyError):
        return f"no {exc} entry"
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _read(path: Path, mmap: bool, meta: dict | None) -> tuple[dict[str, torch.Tensor], CLIPConfig | None, str]:
    if path.is_dir():
        return _read_hf_dir(path, mmap)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: no such file or directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return clean_state_dict(load_file(str(path))), None, "safetensors state dict"
    try:
        obj = _torch_load(path, mmap)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a checkpoint we read"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint loadable with weights_only=True "
                              f"({_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if meta is not None and isinstance(obj.get("state_dict"), dict):
        meta.update((k, v) for k, v in obj.items() if k != "state_dict")
    if obj.get("format") == FORMAT:
        return clean_state_dict(obj["state_dict"]), CLIPConfig.from_dict(obj["config"]), FORMAT
    if isinstance(obj.get("state_dict"), dict):
        return clean_state_dict(obj["state_dict"]), None, "cn_clip checkpoint"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return clean_state_dict(obj), None, "state dict"
    raise CheckpointError(f"{path} is a dict without a 'state_dict' entry or tensors (keys: {list(obj)[:8]})")


def _torch_load(path: Path, mmap: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) file cannot be mapped: read it whole
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_hf_dir(path: Path, mmap: bool):
    config_file = path / "config.json"
    weights = next((path / name for name in _HF_WEIGHTS if (path / name).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise CheckpointError(f"{path} is a directory but not a Hugging Face model (needs config.json and one of {_HF_WEIGHTS})")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "chinese_clip":
        raise CheckpointError(f"{path} holds a {config.get('model_type')!r} model, not 'chinese_clip'")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(weights))
    else:
        sd = _torch_load(weights, mmap)
    return hf.from_hf_state_dict(sd), hf.config_from_hf(config), "Hugging Face ChineseCLIPModel"


_PREFIXES = re.compile(r"^((module|_orig_mod)\.)+")


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile prefixes, drop the unused BERT pooler, and convert cn_clip's
    flash-attention layout (`Wqkv`) to the standard one."""
    sd = {_PREFIXES.sub("", k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("bert.pooler.") and not k.endswith("position_ids")}
    out = {}
    for key, value in sd.items():
        if ".attn.Wqkv." in key:
            out[key.replace(".attn.Wqkv.", ".attn.in_proj_")] = value
        elif ".attention.self.Wqkv." in key:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[key.replace(".Wqkv.", f".{name}.")] = part
        elif ".attention.self.out_proj." in key:
            out[key.replace(".attention.self.out_proj.", ".attention.output.dense.")] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- architecture inference

def _count(sd: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def infer_config(sd: dict[str, torch.Tensor], source: str | Path | None = None) -> CLIPConfig:
    """The architecture the weights describe (depths, widths, patch, resolution); errors name `source`."""
    where = f"{source}: " if source else ""
    try:
        return CLIPConfig(_infer_embed_dim(sd), _infer_vision(sd), _infer_text(sd))
    except KeyError as exc:
        raise CheckpointError(f"{where}not a Chinese-CLIP state dict: missing {exc.args[0]!r}") from None
    except (AttributeError, IndexError, TypeError, ValueError) as exc:  # tensors of the wrong rank or size
        raise CheckpointError(f"{where}not a Chinese-CLIP state dict ({_reason(exc)})") from None


def _infer_embed_dim(sd) -> int:
    return sd["text_projection"].shape[1]


def _infer_vision(sd) -> VisionConfig:
    if "visual.layer1.0.conv1.weight" in sd:
        stages = tuple(_count(sd, rf"visual\.layer{s}\.(\d+)\.") for s in range(1, 5))
        grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
        vision = dict(image_size=grid * 32, layers=stages, width=sd["visual.conv1.weight"].shape[0] * 2, patch_size=None)
    else:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        layers = _count(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
        vision = dict(image_size=grid * patch, layers=layers, width=width, patch_size=patch)
    return VisionConfig(**vision, head_width=_head_width(vision))


def _head_width(vision: dict) -> int:
    """Heads are invisible in the weights: take them from the named config of the
    same shape (ViT-H-14 uses 80), else the usual 64."""
    for name in config_names("vision"):
        named = load_vision_json(name)[1]
        if (named.layers, named.width, named.patch_size) == (vision["layers"], vision["width"], vision["patch_size"]):
            return named.head_width
    return 64


def _infer_text(sd) -> TextConfig:
    vocab_size, hidden = sd["bert.embeddings.word_embeddings.weight"].shape
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=_count(sd, r"bert\.encoder\.layer\.(\d+)\."),
        intermediate_size=sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["bert.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
    )
    # Heads and dropout are invisible in the weights: take them from the named config
    # of the same shape, else BERT's usual 64-wide heads and 0.1 dropout.
    for name in config_names("text"):
        named = load_text_json(name)
        if (named.hidden_size, named.num_layers, named.intermediate_size) == (
                hidden, shape["num_layers"], shape["intermediate_size"]):
            return dataclasses.replace(named, **shape)
    return TextConfig(**shape, num_heads=max(1, hidden // 64))


# ---------------------------------------------------------------- building

def build_model(config: CLIPConfig, sd: dict[str, torch.Tensor] | None = None, source: str = "weights") -> CLIP:
    """A model of `config`; with `sd`, its weights are used directly (no random init
    first) and converted to contiguous fp32, as cn_clip does on CPU."""
    if sd is None:
        return CLIP(config)
    with torch.device("meta"):
        model = CLIP(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{source} does not fit {config.struct_name()}: {detail[:600]}") from None
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.float().contiguous()
    return model


def load_model(path: str | Path) -> CLIP:
    """A CLIP model from any supported checkpoint, architecture inferred; in eval mode."""
    sd, config, kind = read_checkpoint(path)
    config = config or infer_config(sd, path)
    model = build_model(config, sd, source=str(path))
    log.info("loaded %s (%s) from %s", config.struct_name(), kind, path)
    return model.eval()


def inspect_checkpoint(name_or_path: str | Path, config: CLIPConfig | None = None) -> CLIPConfig:
    """The architecture of a released model or a checkpoint, found without loading the weights
    (memory-mapped), for a job's driver to check before it starts workers: every way the file
    would fail to load (unreadable, not CLIP weights, shapes that do not fit) raises
    CheckpointError naming it here. `config`: the architecture the weights must fit instead of
    their own (a finetuning run's). A released name is not downloaded: its architecture is known."""
    if str(name_or_path) in RELEASES:
        return config_from_struct(str(name_or_path).removeprefix("QA-CLIP-"))  # QA-CLIP: cn_clip's architectures
    path = resolve(name_or_path)
    sd, recorded, _ = read_checkpoint(path, mmap=True)
    config = config or recorded or infer_config(sd, path)
    with torch.device("meta"):
        expected = {key: tensor.shape for key, tensor in CLIP(config).state_dict().items()}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    wrong = [f"{key} {tuple(getattr(sd[key], 'shape', ()))} (expected {tuple(shape)})"
             for key, shape in expected.items() if key in sd and getattr(sd[key], "shape", None) != shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{path} does not fit {config.struct_name()}: {detail}")
    return config


# ---------------------------------------------------------------- writing

def _cpu_state(weights: CLIP | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict, or a state dict (e.g. gathered from ZeRO-3 shards), on the CPU."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return {k: v.detach().cpu() for k, v in state.items()}


def save_checkpoint(weights: CLIP | dict[str, torch.Tensor], path: str | Path, config: CLIPConfig | None = None,
                    **meta) -> Path:
    """Our format: the config travels with the weights, so nothing is guessed on load.
    `weights`: a model, or a state dict with its `config`."""
    if config is None:
        if not isinstance(weights, CLIP):
            raise TypeError("save_checkpoint of a state dict needs its config")
        config = weights.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "version": 1, "config": config.to_dict(), "state_dict": _cpu_state(weights), **meta},
               path)
    return path


def export_cn_clip(weights: CLIP | dict[str, torch.Tensor], path: str | Path, epoch: int = 0, step: int = 0,
                   name: str = "export", optimizer: dict | None = None, **meta) -> Path:
    """cn_clip's training checkpoint layout: `module.`-prefixed keys, as DDP saves them.
    `weights`: a model or its state dict; `meta`: more top-level entries (cn_clip ignores them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"module." + k: v for k, v in _cpu_state(weights).items()}
    payload = {"epoch": epoch, "step": step, "name": name, "state_dict": state, **meta}
    if optimizer is not None:
        payload["optimizer"] = optimizer
    torch.save(payload, path)
    return path


def export_hf(model: CLIP, out_dir: str | Path) -> Path:
    """A directory `transformers.ChineseCLIPModel.from_pretrained` loads, with the
    tokenizer vocabulary and a square-resize image processor config."""
    from transformers import ChineseCLIPModel

    from .tokenizer import get_tokenizer

    out_dir = Path(out_dir)
    hf_model = ChineseCLIPModel(hf.config_to_hf(model.config))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(hf.to_hf_state_dict(state), strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise CheckpointError(f"conversion to Hugging Face failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf_model.save_pretrained(out_dir)
    get_tokenizer().save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(model.image_size), indent=2))
    return out_dir


def _image_processor_config(size: int) -> dict:
    """cn_clip's preprocessing: bicubic resize to size x size, no centre crop."""
    from .transforms import MEAN, STD

    return {
        "image_processor_type": "ChineseCLIPImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_center_crop": False, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True,
    }
