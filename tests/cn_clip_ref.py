"""The reference implementation, cn_clip 1.6.0 (installed with --no-deps by the
Makefile), imported without its package __init__ files: those import torchvision,
which has no working CPU build here. Only its pure-PyTorch modules are used."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def import_cn_clip():
    """cn_clip.clip with model.py, bert_tokenizer.py and eval/ importable; skips the test if absent."""
    if "cn_clip.clip.model" not in sys.modules:
        spec = importlib.util.find_spec("cn_clip")
        if spec is None:
            pytest.skip("cn_clip (reference) is not installed")
        root = spec.submodule_search_locations[0]
        package = types.ModuleType("cn_clip")
        package.__path__, package.__spec__ = [root], spec  # find_spec("cn_clip") keeps working
        clip = types.ModuleType("cn_clip.clip")
        clip.__path__ = [f"{root}/clip"]
        sys.modules["cn_clip"], sys.modules["cn_clip.clip"] = package, clip
        tokenizer_module = importlib.import_module("cn_clip.clip.bert_tokenizer")
        clip._tokenizer = tokenizer_module.FullTokenizer()
        importlib.import_module("cn_clip.clip.model")
    return sys.modules["cn_clip.clip"]


def cn_clip_model(cfg):
    """A random-weight cn_clip CLIP with the architecture of our CLIPConfig `cfg`."""
    import_cn_clip()
    v, t = cfg.vision, cfg.text
    info = dict(
        embed_dim=cfg.embed_dim, image_resolution=v.image_size, vision_layers=list(v.layers) if v.is_resnet else v.layers,
        vision_width=v.width, vision_patch_size=v.patch_size, vision_head_width=v.head_width,
        vocab_size=t.vocab_size, text_attention_probs_dropout_prob=t.attention_dropout, text_hidden_act=t.hidden_act,
        text_hidden_dropout_prob=t.hidden_dropout, text_hidden_size=t.hidden_size,
        text_initializer_range=t.initializer_range, text_intermediate_size=t.intermediate_size,
        text_max_position_embeddings=t.max_position_embeddings, text_num_attention_heads=t.num_heads,
        text_num_hidden_layers=t.num_layers, text_type_vocab_size=t.type_vocab_size,
    )
    return sys.modules["cn_clip.clip.model"].CLIP(**info).float().eval()


def cn_clip_configs_dir():
    from pathlib import Path

    return Path(import_cn_clip().__path__[0]) / "model_configs"
