"""Pieces of the Serve application that need no Ray: config checks, the image store behind
GET /images/{id}, JSON float encoding, request chunking, direct-ingress addresses."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

from serve import _ray_compat
from serve.app import enable_direct_ingress, gateway_urls
from serve.batching import chunks, num_items
from serve.config import ServeConfig
from serve.images import ImageStore, image_media_type
from serve.schemas import floats


def test_config_checks_user_mistakes():
    assert ServeConfig(checkpoints={"a": "x.pt", "b": "y.pt"}).default_model == "a"
    for bad in (dict(checkpoints={}), dict(checkpoints={"a": "x"}, max_models_per_replica=0),
                dict(checkpoints={"a": "x"}, torch_threads=-1), dict(checkpoints={"a": "x"}, max_batch_size=0),
                dict(checkpoints={"a": "x"}, min_replicas=2, max_replicas=1)):
        with pytest.raises(ValueError):
            ServeConfig(**bad)


def test_image_store_reads_images_by_id_from_a_cn_clip_tsv(tmp_path):
    images = {7: b"\x89PNG first", 12: b"\xff\xd8 second", 3: b"GIF89a third"}
    tsv = tmp_path / "test_imgs.tsv"
    tsv.write_text("".join(f"{i}\t{base64.b64encode(data).decode()}\n" for i, data in images.items()))
    store = ImageStore(str(tsv))
    assert {i: store.get(i) for i in images} == images and store.get(99) is None
    assert [image_media_type(images[i]) for i in (7, 12, 3)] == ["image/png", "image/jpeg", "image/gif"]


def test_floats_are_short_and_within_5e_9():
    vector = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    vector /= np.linalg.norm(vector, axis=1, keepdims=True)
    encoded = json.dumps(floats(vector))
    assert np.abs(np.array(json.loads(encoded)) - vector).max() <= 5e-9 + 1e-12
    assert len(encoded) < 0.65 * len(json.dumps(vector.astype(np.float64).tolist()))


def test_chunks_and_batch_sizes():
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]] and chunks([], 3) == []
    assert num_items([["a"], ["b", "c"], []]) == 3


def test_direct_ingress_urls_from_the_controllers_target_groups():
    from ray.serve._private.common import RequestProtocol
    from ray.serve.schema import Target, TargetGroup

    def group(app, *ports, protocol=RequestProtocol.HTTP):
        return TargetGroup(app_name=app, route_prefix="/", protocol=protocol,
                           targets=[Target(ip="10.0.0.1", port=p, instance_id=str(p), name=str(p)) for p in ports])

    proxies = group("", 8000)  # direct ingress off: only the proxies' group, with no application
    assert _ray_compat.urls_from_target_groups([proxies], "clip", "127.0.0.1", 8000) is None
    replicas = [group("clip", 30001, 30000), group("clip", 40000, protocol=RequestProtocol.GRPC), group("other", 30002)]
    assert _ray_compat.urls_from_target_groups(replicas, "clip", "127.0.0.1", 8000) == ["http://127.0.0.1:30000",
                                                                                          "http://127.0.0.1:30001"]
    assert _ray_compat.urls_from_target_groups([group("clip", 8000)], "clip", "h", 8000) == []  # no replica port yet


def test_without_serve_internals_the_app_falls_back_to_the_proxy(monkeypatch, caplog):
    import ray.serve.context

    monkeypatch.delenv(_ray_compat.DIRECT_INGRESS_ENV, raising=False)
    monkeypatch.setattr(_ray_compat, "_warned", set())
    monkeypatch.delattr(ray.serve.context, "_get_global_client")  # a Ray whose controller API moved
    with caplog.at_level("WARNING", logger=_ray_compat.__name__):
        assert gateway_urls("clip", "127.0.0.1", 8000, timeout_s=0) == ["http://127.0.0.1:8000"]
        assert gateway_urls("clip", "127.0.0.1", 8000, timeout_s=0) == ["http://127.0.0.1:8000"]
    assert len(caplog.records) == 1 and "_get_global_client" in caplog.text  # one warning, naming what is gone

    monkeypatch.setattr(_ray_compat, "TESTED", ((1, 0), (1, 0)))  # an untested Ray: the flag stays off
    with caplog.at_level("WARNING", logger=_ray_compat.__name__):
        assert enable_direct_ingress() is False
    assert _ray_compat.DIRECT_INGRESS_ENV not in os.environ and "is not the tested 1.0" in caplog.text
