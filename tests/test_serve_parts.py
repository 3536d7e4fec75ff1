"""Pieces of the Serve application that need no Ray: config checks, the image store behind
GET /images/{id}, JSON float encoding, request chunking, direct-ingress addresses."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from serve.app import ImageStore, ServeConfig, chunks, direct_ingress_urls, floats, image_media_type, num_items


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
    assert direct_ingress_urls([proxies], "clip", "127.0.0.1", 8000) is None
    replicas = [group("clip", 30001, 30000), group("clip", 40000, protocol=RequestProtocol.GRPC), group("other", 30002)]
    assert direct_ingress_urls(replicas, "clip", "127.0.0.1", 8000) == ["http://127.0.0.1:30000",
                                                                          "http://127.0.0.1:30001"]
    assert direct_ingress_urls([group("clip", 8000)], "clip", "h", 8000) == []  # no replica port yet: the proxy's
