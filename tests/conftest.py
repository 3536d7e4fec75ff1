"""Shared fixtures: tiny random-weight models and, for job tests, one local Ray."""
from __future__ import annotations

import os

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


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
RAY_LOCAL_ARGS = dict(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
                      configure_logging=False, log_to_driver=False)


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


def start_local_ray():
    """The one local Ray of the test session (2 CPUs, small object store), started on
    first use and again after a multi-node test replaced it."""
    import ray

    if not ray.is_initialized():
        # Serve's direct ingress, as `python -m serve` runs it (read when Ray's processes start):
        # the Serve tests reach the Gateway both through the proxy and on its replica's own port.
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # no balancer to drain
        # The S3 tests' server (moto, on loopback) takes any keys; Ray's workers read them from
        # here, so every process of the session has them. No instance metadata service to ask.
        for name, value in S3_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(**RAY_LOCAL_ARGS)
    return ray


@pytest.fixture
def ray_local(_ray_session):
    return start_local_ray()


@pytest.fixture
def ray_cluster(_ray_session):
    """A 4-node Ray cluster on this machine (ray.cluster_utils): a 1-CPU head and three
    2-CPU worker nodes. Replaces the local Ray for the test; ray_local comes back after."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False,
                                                                object_store_memory=128 * 2**20))
    for _ in range(3):
        cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
