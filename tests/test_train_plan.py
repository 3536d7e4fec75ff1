"""The sample plan (no Ray): cn_clip's order, sharding, resume offsets."""
from __future__ import annotations

import numpy as np
import pytest

from clip_platform.train.trainer import cosine_lr
from clip_platform.train.validation import retrieval_recall
from clip_platform.train.plan import Plan


def test_ranks_together_see_each_global_batch_of_a_single_worker():
    one = Plan(100, batch_size=8, world_size=1, seed=7)
    two = Plan(100, batch_size=4, world_size=2, seed=7)
    single = one.rank_indices(epoch=3, rank=0)
    ranks = [two.rank_indices(epoch=3, rank=r) for r in range(2)]
    for step in range(one.steps_per_epoch):
        merged = np.concatenate([r[step * 4:(step + 1) * 4] for r in ranks])
        assert sorted(merged) == sorted(single[step * 8:(step + 1) * 8])


def test_epoch_covers_every_sample_with_cn_clip_padding():
    plan = Plan(10, batch_size=4, world_size=1, seed=0)
    order = plan.epoch_order(0)
    assert len(order) == 12 and set(order) == set(range(10))  # padded to whole batches with repeats
    assert not np.array_equal(plan.epoch_order(0), plan.epoch_order(1))


def test_resume_offset_continues_mid_epoch():
    plan = Plan(64, batch_size=4, world_size=2, accum_freq=2, seed=1)
    full = plan.rank_indices(epoch=0, rank=1)
    assert np.array_equal(plan.rank_indices(epoch=0, rank=1, start_step=2), full[2 * 8:])
    assert len(full) == plan.steps_per_epoch * 8


def test_data_smaller_than_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Plan(10, batch_size=4, world_size=2, accum_freq=2)


def test_cosine_schedule_as_cn_clip():
    assert cosine_lr(1.0, 10, 100, 0) == pytest.approx(0.1)
    assert cosine_lr(1.0, 10, 100, 9) == pytest.approx(1.0)
    assert cosine_lr(1.0, 10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 10, 100, 55) == pytest.approx(0.5)
    assert cosine_lr(1.0, 10, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_retrieval_recall_counts_any_ground_truth_image():
    import torch

    eye = torch.eye(3)
    samples = {0: (10, 1, eye[0], eye[0]), 1: (11, 2, eye[1], eye[1]), 2: (12, 2, 0.6 * eye[1] + 0.8 * eye[2], eye[1])}
    recall = retrieval_recall(samples)
    assert recall["valid_t2i_r1"] == 100.0
    assert recall["valid_i2t_r1"] == 100.0  # image 12's only text is text 2: found first


@pytest.mark.parametrize("recipe", ["demo.yaml", "muge_finetune.yaml", "flickr30k_finetune.yaml", "flickr8k_cn.yaml"])
def test_recipes_build_a_train_config(recipe):
    from pathlib import Path

    from clip_platform import config
    from clip_platform.train import TrainConfig

    data = config.load_yaml(Path(__file__).resolve().parents[1] / "configs" / recipe)
    train = config.build(TrainConfig, data.get("finetune", data))
    assert train.lr and train.beta2 and train.batch_size >= 1
