"""Shared fixtures: tiny random-weight models and, for job tests, one local Ray."""
from __future__ import annotations

import pytest
import torch

import clip_models

TINY_VIT = "ViT-Tiny@BERT-Tiny-chinese"
TINY_RN = "RN-Tiny@BERT-Tiny-chinese"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit() -> clip_models.CLIP:
    return clip_models.create_model(TINY_VIT).eval()


@pytest.fixture
def tiny_rn() -> clip_models.CLIP:
    return clip_models.create_model(TINY_RN).eval()


@pytest.fixture(scope="session")
def ray_local():
    """The one local Ray for the whole test session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
