"""Conversion between cn_clip's state-dict layout (ours) and Hugging Face
`ChineseCLIPModel`. RN50 has no Hugging Face counterpart."""
from __future__ import annotations

import re

import torch

from .config import CLIPConfig, TextConfig, VisionConfig

# Renames that need no reshaping: (ours, Hugging Face) prefixes; "{i}" is a layer index.
_RENAMES = [
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.transformer.resblocks.{i}.attn.out_proj.", "vision_model.encoder.layers.{i}.self_attn.out_proj."),
    ("visual.transformer.resblocks.{i}.ln_1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("visual.transformer.resblocks.{i}.ln_2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("visual.transformer.resblocks.{i}.mlp.c_fc.", "vision_model.encoder.layers.{i}.mlp.fc1."),
    ("visual.transformer.resblocks.{i}.mlp.c_proj.", "vision_model.encoder.layers.{i}.mlp.fc2."),
    ("bert.", "text_model."),
    ("logit_scale", "logit_scale"),
]


def _prefix_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_OURS_TO_HF = [(_prefix_pattern(ours), theirs) for ours, theirs in _RENAMES]
_HF_TO_OURS = [(_prefix_pattern(theirs), ours) for ours, theirs in _RENAMES]
_IN_PROJ = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, table) -> str | None:
    for pattern, target in table:
        if match := pattern.match(key):
            return target.replace("{i}", match.groupdict().get("i") or "") + key[match.end():]
    return None


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "visual.layer1.0.conv1.weight" in sd:
        raise ValueError("RN50 (ModifiedResNet) models have no Hugging Face ChineseCLIPModel counterpart")
    out = {
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    for key, value in sd.items():
        if match := _IN_PROJ.match(key):
            layer, kind = match.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif (new := _rename(key, _OURS_TO_HF)) is not None:
            out[new] = value
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"text_projection": hf["text_projection.weight"].t().contiguous(),
           "visual.proj": hf["visual_projection.weight"].t().contiguous()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if match := _HF_QKV.match(key):
            layer, name, kind = match.groups()
            qkv.setdefault((layer, kind), {})[name] = value
        elif key.endswith("position_ids") or key.startswith("text_model.pooler."):
            continue
        elif (new := _rename(key, _HF_TO_OURS)) is not None:
            out[new] = value
    for (layer, kind), parts in qkv.items():
        out[f"visual.transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


def config_from_hf(hf_config) -> CLIPConfig:
    """CLIPConfig from a transformers ChineseCLIPConfig (or its dict)."""
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    v, t = d["vision_config"], d["text_config"]
    vision = VisionConfig(
        image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
        patch_size=v["patch_size"], head_width=v["hidden_size"] // v["num_attention_heads"],
    )
    text = TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
        max_position_embeddings=t["max_position_embeddings"], type_vocab_size=t["type_vocab_size"],
        hidden_act=t.get("hidden_act", "gelu"), hidden_dropout=t.get("hidden_dropout_prob", 0.1),
        attention_dropout=t.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=t.get("layer_norm_eps", 1e-12), initializer_range=t.get("initializer_range", 0.02),
    )
    return CLIPConfig(d["projection_dim"], vision, text)


def config_to_hf(cfg: CLIPConfig):
    from transformers import ChineseCLIPConfig

    if cfg.vision.is_resnet:
        raise ValueError("RN50 (ModifiedResNet) models have no Hugging Face ChineseCLIPModel counterpart")
    v, t = cfg.vision, cfg.text
    return ChineseCLIPConfig(
        projection_dim=cfg.embed_dim,
        vision_config=dict(
            hidden_size=v.width, intermediate_size=4 * v.width, num_hidden_layers=v.layers,
            num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=cfg.embed_dim,
        ),
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
            hidden_act=t.hidden_act, hidden_dropout_prob=t.hidden_dropout,
            attention_probs_dropout_prob=t.attention_dropout, layer_norm_eps=t.layer_norm_eps,
            initializer_range=t.initializer_range, pad_token_id=0,
        ),
    )
