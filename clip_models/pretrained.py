"""Initialise the towers from separate pretrained weights, as cn_clip's
`--clip-weight-path` / `--bert-weight-path`: the vision tower and logit_scale from an
OpenAI CLIP checkpoint (its TorchScript archive or a plain state dict), the text tower
from a Chinese BERT (a Hugging Face directory or a state dict). Projections start fresh."""
from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError
from .model import CLIP

log = logging.getLogger(__name__)
_BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)  # copied unchanged
    resized: list[str] = field(default_factory=list)  # interpolated to the model's grid
    new: list[str] = field(default_factory=list)  # left at their random initialisation

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded, {len(self.resized)} resized ({', '.join(self.resized) or '-'}), "
                f"{len(self.new)} left new ({', '.join(self.new[:6])}{' ...' if len(self.new) > 6 else ''})")


def init_from_pretrained(model: CLIP, clip_path: str | None = None, bert_path: str | None = None) -> InitReport:
    """Copy pretrained tower weights into `model` (in place); refuses mismatched shapes."""
    incoming: dict[str, torch.Tensor] = {}
    if clip_path:
        incoming.update({k: v for k, v in read_openai_clip(clip_path).items()
                         if k.startswith("visual.") or k == "logit_scale"})
    if bert_path:
        incoming.update(read_bert(bert_path))
    report = InitReport()
    own = model.state_dict()
    if "visual.positional_embedding" in incoming and "visual.positional_embedding" in own:
        target = own["visual.positional_embedding"].shape
        if incoming["visual.positional_embedding"].shape != target:
            incoming["visual.positional_embedding"] = resize_positional_embedding(
                incoming["visual.positional_embedding"], target[0] - 1)
            report.resized.append("visual.positional_embedding")
    unknown = sorted(set(incoming) - set(own))
    mismatched = [f"{k}: {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in incoming if k in own and incoming[k].shape != own[k].shape]
    if unknown or mismatched:
        raise CheckpointError(
            f"pretrained weights do not fit {model.config.struct_name()}: "
            + (f"unknown tensors {unknown[:5]}; " if unknown else "")
            + (f"shape mismatches {mismatched[:5]}" if mismatched else "")
            + " (choose --vision-model / --text-model to match the weights)")
    with torch.no_grad():
        for key, value in incoming.items():
            own[key].copy_(value.to(own[key].dtype))
    report.loaded = [k for k in incoming if k not in report.resized]
    report.new = [k for k in own if k not in incoming]
    log.info("pretrained initialisation: %s", report.summary())
    return report


def read_openai_clip(path: str | Path) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's state dict from its TorchScript archive or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no CLIP weights at {path}")
    if _is_torchscript(path):  # OpenAI's released files (e.g. ViT-B-16.pt) are TorchScript archives
        try:
            return {k: v.float() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable TorchScript CLIP archive ({exc})") from None
    try:
        return _state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is neither a state dict nor a TorchScript CLIP archive ({exc})") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_bert(path: str | Path) -> dict[str, torch.Tensor]:
    """A Chinese BERT's encoder weights under our `bert.` prefix (pooler and heads dropped)."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in _BERT_WEIGHTS if (path / n).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a Hugging Face BERT directory (config.json + {_BERT_WEIGHTS})")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in ("bert", "roberta", None):
            raise CheckpointError(f"{path} holds a {model_type!r} model, not a BERT")
        path = weights
    elif not path.is_file():
        raise CheckpointError(f"no BERT weights at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("bert.").removeprefix("text_model.")
        if key.startswith(("embeddings.", "encoder.")) and not key.endswith("position_ids"):
            out["bert." + key] = value
    if not out:
        raise CheckpointError(f"{path} holds no BERT encoder weights (embeddings.*, encoder.*)")
    return out


def _state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resize_positional_embedding(embedding: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubic resize of the patch grid (class token kept), as cn_clip's resize_pos_embed."""
    token, grid = embedding[:1], embedding[1:]
    old, new = int(len(grid) ** 0.5), int(num_patches ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=True)
    return torch.cat([token, grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(embedding.dtype)])
