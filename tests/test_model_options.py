"""Options of the model: FLIP masking, gradient checkpointing, frozen vision tower,
the contrastive loss, bf16 CPU inference on packed weights, and the fallbacks when
torch's private APIs are missing."""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

import clip_models
from clip_models import _torch_compat
from clip_models.packed import PackedLinears, packed_linears
from clip_models.vit import keep_random_patches


def grads(model, images, tokens, **kw):
    model.zero_grad()
    image_features, text_features, scale = model(images, tokens, **kw)
    loss, _ = clip_models.contrastive_loss(image_features, text_features, scale)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flip_keeps_class_token_and_a_share_of_patches():
    x = torch.arange(2 * 17 * 4, dtype=torch.float32).view(2, 17, 4)
    kept = keep_random_patches(x, 0.5)
    assert kept.shape == (2, 1 + 8, 4)
    assert torch.equal(kept[:, 0], x[:, 0])
    for sample, row in enumerate(kept):  # kept patches are distinct real patches, never the class token
        positions = [int(v) // 4 - sample * 17 for v in row[1:, 0]]
        assert len(set(positions)) == 8 and all(1 <= p <= 16 for p in positions)


def test_mask_ratio_changes_image_features_in_training_only_path(tiny_vit):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tiny_vit.encode_image(images)
        masked = tiny_vit.encode_image(images, mask_ratio=0.5)
    assert full.shape == masked.shape and not torch.allclose(full, masked)


def test_grad_checkpointing_gives_the_same_gradients(tiny_vit):
    tiny_vit.train()
    for module in tiny_vit.modules():  # dropout off, so both passes are deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in tiny_vit.bert.encoder.layer:
        layer.attention.self.dropout_p = 0.0
    images, tokens = torch.randn(4, 3, 32, 32), clip_models.tokenize(["一", "二三", "四五六", "七"])
    plain = grads(tiny_vit, images, tokens)
    tiny_vit.set_grad_checkpointing(True)
    checkpointed = grads(tiny_vit, images, tokens)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)


def test_freeze_vision_stops_vision_gradients_and_keeps_batchnorm_stats(tiny_rn):
    tiny_rn.freeze_vision()
    tiny_rn.train()
    assert not tiny_rn.visual.training and tiny_rn.bert.training
    before = tiny_rn.visual.bn1.running_mean.clone()
    g = grads(tiny_rn, torch.randn(4, 3, 64, 64), clip_models.tokenize(["一", "二", "三", "四"]))
    assert not any(n.startswith("visual.") for n in g) and "text_projection" in g
    assert torch.equal(before, tiny_rn.visual.bn1.running_mean)


def test_contrastive_loss_and_accuracy():
    features = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    loss, acc = clip_models.contrastive_loss(features, features, torch.tensor(100.0))
    assert loss.item() < 1e-3 and acc == {"i2t": 1.0, "t2i": 1.0}
    loss_shuffled, acc_shuffled = clip_models.contrastive_loss(features, features.roll(1, 0), torch.tensor(100.0))
    assert loss_shuffled > loss and acc_shuffled["i2t"] == 0.0


def test_contrastive_loss_masks_bad_slots_as_if_they_were_absent():
    images, texts = (torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    valid = torch.tensor([True, False, True, True, False])
    masked, masked_acc = clip_models.contrastive_loss(images, texts, torch.tensor(10.0), valid=valid)
    subset, subset_acc = clip_models.contrastive_loss(images[valid], texts[valid], torch.tensor(10.0))
    torch.testing.assert_close(masked, subset)
    assert masked_acc == subset_acc


def test_distillation_loss_is_zero_on_the_teacher_and_fits_another_width():
    teacher = torch.randn(4, 8)
    assert clip_models.distillation_loss(teacher, teacher).abs() < 1e-6
    student = torch.randn(4, 16, requires_grad=True)  # cn_clip resizes the student to the teacher's width
    loss = clip_models.distillation_loss(teacher, student)
    loss.backward()
    assert loss.shape == () and 0 < loss < 2 and student.grad is not None


@pytest.mark.skipif(_torch_compat.packed_linear_ops("cpu") is None, reason="this CPU has no oneDNN bf16")
def test_packed_linears_give_the_autocast_results(tiny_vit):
    images = torch.randint(0, 256, (3, 3, tiny_vit.image_size, tiny_vit.image_size), dtype=torch.uint8)
    tokens = clip_models.tokenize(["一只猫", "两只狗在草地上"], pad_to_longest=True)
    visual = packed_linears(tiny_vit.visual, "cpu", torch.bfloat16)
    assert isinstance(visual, PackedLinears) and visual.packed  # the ViT's in_proj and its nn.Linear layers
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected_images, expected_texts = tiny_vit.encode_image(images), tiny_vit.encode_text(tokens)
        for _ in range(2):  # the context is entered once per batch
            with visual:
                got_images = tiny_vit.encode_image(images)
                got_texts = tiny_vit.encode_text(tokens)  # the text tower's weights were not packed: autocast's path
            torch.testing.assert_close(got_images, expected_images, atol=2e-3, rtol=1e-2)
            torch.testing.assert_close(got_texts, expected_texts, atol=0, rtol=0)
        with packed_linears(tiny_vit.bert, "cpu", torch.bfloat16):
            torch.testing.assert_close(tiny_vit.encode_text(tokens), expected_texts, atol=2e-3, rtol=1e-2)


def test_packed_linears_only_for_bf16_on_cpu(tiny_vit):
    assert isinstance(packed_linears(tiny_vit.visual, "cpu", None), contextlib.nullcontext)
    assert isinstance(packed_linears(tiny_vit.visual, "cpu", torch.float16), contextlib.nullcontext)
    assert isinstance(packed_linears(tiny_vit.visual, "cuda", torch.bfloat16), contextlib.nullcontext)


@pytest.fixture
def fresh_warnings(monkeypatch, caplog):
    """The compat module's once-per-feature warnings, forgotten for this test and captured."""
    monkeypatch.setattr(_torch_compat, "_warned", set())
    caplog.set_level("WARNING", logger=_torch_compat.__name__)
    return caplog


def test_the_tested_torch_is_the_installed_one():
    assert _torch_compat.supported(), f"torch {torch.__version__}: retest the private APIs, then widen TESTED"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_without_the_private_mkldnn_ops_bf16_runs_on_autocast(tiny_vit, monkeypatch, fresh_warnings):
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # a torch whose private ops moved
    tokens = clip_models.tokenize(["一只猫", "两只狗在草地上"], pad_to_longest=True)
    assert _torch_compat.packed_linear_ops("cpu") is None
    context = packed_linears(tiny_vit.bert, "cpu", torch.bfloat16)
    assert isinstance(context, contextlib.nullcontext)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = tiny_vit.encode_text(tokens)
        with context:
            torch.testing.assert_close(tiny_vit.encode_text(tokens), expected, atol=0, rtol=0)
    assert len(fresh_warnings.records) == 1 and "_is_mkldnn_bf16_supported" in fresh_warnings.text


def test_on_an_untested_torch_the_private_apis_are_left_alone(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_torch_compat, "TESTED", ((1, 0), (1, 0)))
    assert _torch_compat.inductor_freezing() is None
    assert "is not the tested 1.0" in fresh_warnings.text and "eager encoding" in fresh_warnings.text


def test_without_inductor_config_no_freezing(monkeypatch, fresh_warnings):
    monkeypatch.setitem(sys.modules, "torch._inductor.config", None)  # a torch whose inductor config moved
    assert _torch_compat.inductor_freezing() is None
    assert _torch_compat.inductor_freezing() is None
    assert len(fresh_warnings.records) == 1 and "inductor weight freezing unavailable" in fresh_warnings.text
