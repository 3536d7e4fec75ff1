"""The one "same model" rule (clip_platform.model_info.same_model) on real checkpoints: no Ray."""
from __future__ import annotations

import os
import shutil

import torch

import clip_models
from clip_platform.model_info import inspect_model, same_model


def test_the_fingerprint_names_the_weights_not_how_they_were_typed(tiny_vit, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt" / "epoch_latest.pt"
    checkpoint.parent.mkdir()
    clip_models.save_checkpoint(tiny_vit, checkpoint)
    monkeypatch.chdir(tmp_path)
    relative, absolute = inspect_model("ckpt/epoch_latest.pt"), inspect_model(str(checkpoint))
    copy = tmp_path / "elsewhere" / "epoch_latest.pt"
    copy.parent.mkdir()
    shutil.copyfile(checkpoint, copy)
    os.utime(copy, ns=(1, 1))  # another time: still the same weights
    copied = inspect_model(str(copy))
    assert same_model(relative.fingerprint, absolute.fingerprint) and same_model(relative.fingerprint, copied.fingerprint)
    assert relative.key == absolute.key == copied.key  # one exported-graph cache folder
    assert relative.fingerprint["source"] == "ckpt/epoch_latest.pt"  # kept for messages


def test_other_weights_of_the_same_size_are_another_model(tiny_vit, tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    clip_models.save_checkpoint(tiny_vit, first)
    with torch.no_grad():
        next(tiny_vit.parameters()).add_(1.0)  # one finetuned tensor
    clip_models.save_checkpoint(tiny_vit, second)
    a, b = inspect_model(str(first)), inspect_model(str(second))
    assert first.stat().st_size == second.stat().st_size
    assert not same_model(a.fingerprint, b.fingerprint) and a.key != b.key


def test_fingerprints_recorded_before_digests_compare_by_name_and_size():
    recorded = {"source": "ckpt/epoch_latest.pt", "name": "ViT-B-16@RoBERTa", "files": [["epoch_latest.pt", 100, 1]]}
    now = {"source": "/abs/epoch_latest.pt", "name": "ViT-B-16@RoBERTa", "files": [["epoch_latest.pt", 100, "ab12"]]}
    assert same_model(recorded, now)
    assert not same_model(recorded, {**now, "files": [["epoch_latest.pt", 101, "ab12"]]})
    assert not same_model(recorded, {**now, "name": "RN50@RBT3"})
    assert not same_model(None, now)


def test_an_embed_run_resumes_whatever_the_checkpoint_path_was_spelled():
    from clip_platform.batch.embed.job import same_settings

    files = [["epoch_latest.pt", 100, "ab12"]]
    saved = {"model": {"source": "ckpt/epoch_latest.pt", "name": "ViT-Tiny", "files": files}, "precision": "fp32"}
    now = {"model": {"source": "/abs/ckpt/epoch_latest.pt", "name": "ViT-Tiny", "files": files}, "precision": "fp32"}
    assert same_settings(saved, now)
    assert not same_settings(saved, {**now, "precision": "bf16"})
    assert not same_settings(saved, {**now, "model": {**now["model"], "files": [["epoch_latest.pt", 100, "cd34"]]}})
    assert not same_settings(None, now)
