"""Feature parity with the reference implementations: transformers' ChineseCLIPModel
(ViT models, converted both ways) and cn_clip 1.6.0 itself (all towers, RN50 included)."""
from __future__ import annotations

import pytest
import torch

import clip_models
from clip_models import hf
from cn_clip_ref import cn_clip_model

TEXTS = ["一只可爱的小猫咪", "北京天安门广场的夜景", "iPhone 15 Pro Max", "短"]


def hf_features(hf_model, images, tokens):
    def unwrap(out):
        return out if torch.is_tensor(out) else out.pooler_output

    with torch.no_grad():
        return (unwrap(hf_model.get_image_features(pixel_values=images)),
                unwrap(hf_model.get_text_features(input_ids=tokens, attention_mask=tokens.ne(0))))


def our_features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def random_hf_model(cfg: clip_models.CLIPConfig):
    from transformers import ChineseCLIPModel

    model = ChineseCLIPModel(hf.config_to_hf(cfg)).eval()
    with torch.no_grad():  # HF zero-inits some tensors; randomise everything so nothing hides
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("struct", ["ViT-Tiny@BERT-Tiny-chinese", "ViT-B-16"])
def test_ours_to_hf_and_back(struct):
    model = clip_models.create_model(struct).eval()
    size = model.image_size
    images, tokens = torch.randn(2, 3, size, size), clip_models.tokenize(TEXTS)
    hf_model = random_hf_model(model.config)
    hf_model.load_state_dict(hf.to_hf_state_dict(model.state_dict()))
    for ours, theirs in zip(our_features(model, images, tokens), hf_features(hf_model, images, tokens)):
        assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("struct", ["ViT-Tiny@BERT-Tiny-chinese", "ViT-B-16"])
def test_hf_to_ours_and_round_trip_is_bit_identical(struct):
    cfg = clip_models.config_from_struct(struct)
    hf_model = random_hf_model(cfg)
    hf_sd = hf_model.state_dict()
    model = clip_models.build_model(hf.config_from_hf(hf_model.config), hf.from_hf_state_dict(hf_sd)).eval()
    assert model.config == cfg
    images, tokens = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size), clip_models.tokenize(TEXTS)
    for ours, theirs in zip(our_features(model, images, tokens), hf_features(hf_model, images, tokens)):
        assert (ours - theirs).abs().max() <= 1e-4
    again = hf.to_hf_state_dict(model.state_dict())
    assert set(again) == set(hf_sd)
    assert all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)


CN_CLIP_CASES = {
    "RN50": "RN50@RBT3-chinese",
    "ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
    "tiny ViT with ViT-H's 80-wide heads": None,
}


def _case_config(name):
    if CN_CLIP_CASES[name]:
        return clip_models.config_from_struct(CN_CLIP_CASES[name])
    return clip_models.CLIPConfig(32, clip_models.VisionConfig(28, 2, 160, 14, head_width=80),
                                  clip_models.TextConfig(hidden_size=64, num_layers=1, num_heads=1,
                                                         intermediate_size=128, max_position_embeddings=64))


@pytest.mark.parametrize("name", list(CN_CLIP_CASES))
def test_matches_cn_clip_reference(name):
    cfg = _case_config(name)
    reference = cn_clip_model(cfg)
    sd = reference.state_dict()
    model = clip_models.build_model(cfg, sd).eval()
    if CN_CLIP_CASES[name]:
        assert clip_models.infer_config(sd) == cfg
        assert model.config.struct_name() == CN_CLIP_CASES[name]
    size = cfg.vision.image_size
    images, tokens = torch.randn(2, 3, size, size), clip_models.tokenize(TEXTS)
    with torch.no_grad():
        expected = reference.encode_image(images), reference.encode_text(tokens)
        logits_ref = reference.get_similarity(images, tokens)
        logits = model.get_similarity(images, tokens)
    for ours, theirs in zip(our_features(model, images, tokens), expected):
        assert (ours - theirs).abs().max() <= 1e-4
    torch.testing.assert_close(logits, logits_ref, atol=1e-3, rtol=0)


def test_shipped_configs_equal_cn_clips(tmp_path):
    import json

    from cn_clip_ref import cn_clip_configs_dir
    from clip_models.config import CONFIG_DIR

    for path in cn_clip_configs_dir().glob("*.json"):
        theirs = json.loads(path.read_text())
        if isinstance(theirs.get("vision_layers"), str):
            theirs["vision_layers"] = json.loads(theirs["vision_layers"])
        assert json.loads((CONFIG_DIR / path.name).read_text()) == theirs, path.name


def test_forward_returns_normalised_features_and_scale(tiny_vit):
    images, tokens = torch.randn(3, 3, 32, 32), clip_models.tokenize(TEXTS[:3])
    with torch.no_grad():
        image_features, text_features, scale = tiny_vit(images, tokens)
        assert torch.allclose(image_features.norm(dim=-1), torch.ones(3))
        assert torch.allclose(text_features.norm(dim=-1), torch.ones(3))
        assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
        assert torch.equal(tiny_vit(None, tokens), tiny_vit.encode_text(tokens))
    with pytest.raises(ValueError):
        tiny_vit(None, None)
