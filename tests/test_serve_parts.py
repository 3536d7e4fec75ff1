"""Pieces of the Serve application that need no Ray: config checks, the image store behind
GET /images/{id}, JSON float encoding, request chunking, direct-ingress addresses."""
from __future__ import annotations

import base64
import socket
import json
import os

import numpy as np
import pytest
from fastapi import Request  # at module level: FastAPI resolves the echo route's string annotation here

from clip_platform.data.lookup import TsvImages
from serve import _ray_compat
from serve.app import enable_direct_ingress, gateway_urls
from serve.batching import chunks, num_items
from serve.config import ServeConfig
from serve.images import image_media_type
from serve.schemas import floats


def test_config_checks_user_mistakes():
    assert ServeConfig(checkpoints={"a": "x.pt", "b": "y.pt"}).default_model == "a"
    for bad in (dict(checkpoints={}), dict(checkpoints={"a": "x"}, max_models_per_replica=0),
                dict(checkpoints={"a": "x"}, torch_threads=-1), dict(checkpoints={"a": "x"}, max_batch_size=0),
                dict(checkpoints={"a": "x"}, min_replicas=2, max_replicas=1)):
        with pytest.raises(ValueError):
            ServeConfig(**bad)


def test_tsv_images_reads_images_by_id_from_a_cn_clip_tsv(tmp_path):
    images = {7: b"\x89PNG first", 12: b"\xff\xd8 second", 3: b"GIF89a third"}
    tsv = tmp_path / "test_imgs.tsv"
    tsv.write_text("".join(f"{i}\t{base64.b64encode(data).decode()}\n" for i, data in images.items())
                   + "not a line of the format\n")
    store = TsvImages(str(tsv))
    assert store.num_bad == 1  # skipped and counted, as the batch jobs do
    assert {i: store.get(i) for i in images} == images and store.get(99) is None
    assert len(store) == 3 and 12 in store and 99 not in store
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


def test_index_shards_are_dealt_over_search_groups():
    from serve.search import shard_groups

    assert shard_groups(5, 2) == [[0, 2, 4], [1, 3]]
    assert shard_groups(2, 0) == [[0], [1]] == shard_groups(2, 5)  # 0: one per shard; never an empty group
    assert shard_groups(1, 0) == [[0]]


def test_request_schemas_refuse_what_a_body_gets_wrong_on_its_own():
    from pydantic import ValidationError

    from serve.schemas import ClassifyRequest, EmbeddingsRequest, SearchRequest

    assert SearchRequest.model_validate({"image_id": 7}).id == SearchRequest.model_validate({"text_id": 7}).id == 7
    for bad in ({}, {"text": "a", "id": 1}, {"text": " "}, {"text": "a", "top_k": 101}, {"text": "a", "k": 3}):
        with pytest.raises(ValidationError):
            SearchRequest.model_validate(bad)
    image = base64.b64encode(b"bytes").decode()
    assert ClassifyRequest.model_validate({"image": image, "labels": ["猫"], "templates": ["{}{", "{0}{}"]}).image == b"bytes"
    for templates in (["{0.__class__}"], ["{:>200000000}"], [], ["{}"] * 65):
        with pytest.raises(ValidationError):
            ClassifyRequest.model_validate({"image": image, "labels": ["猫"], "templates": templates})
    mixed = EmbeddingsRequest.model_validate({"input": ["红色", "data:image/png;base64," + image], "user": "x"})
    assert mixed.inputs[0] == "红色" and mixed.images == {1: b"bytes"}
    with pytest.raises(ValidationError, match="base64"):
        EmbeddingsRequest.model_validate({"input": "data:image/png;base64,%%"})


@pytest.fixture
def limited_server():
    """The body-limits middleware in front of an echo route, on uvicorn on 127.0.0.1."""
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from serve.limits import RequestBodyLimits

    app = FastAPI()
    app.add_middleware(RequestBodyLimits)

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    saved = RequestBodyLimits.timeout_s, RequestBodyLimits.max_bytes
    RequestBodyLimits.configure(1.0, 1000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)
    RequestBodyLimits.configure(*saved)


def exchange(port: int, head: bytes, body: bytes, byte_interval_s: float = 0.0, limit_s: float = 10.0):
    """Send `head` then `body` (a byte every `byte_interval_s` when given) over a raw socket;
    (everything the server sent until it closed, seconds taken)."""
    import time

    start, reply = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(head)
        if byte_interval_s:
            sock.settimeout(byte_interval_s)
            for i in range(len(body)):
                try:
                    sock.sendall(body[i:i + 1])
                    reply += sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if reply:
                    break
        else:
            sock.sendall(body)
        sock.settimeout(limit_s)
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    return reply, time.monotonic() - start


def test_a_slow_body_gets_408_and_a_large_one_413_without_reading_it(limited_server):
    def head(length: int) -> bytes:
        return f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()

    reply, seconds = exchange(limited_server, head(100), b"x" * 100, byte_interval_s=0.2)
    assert reply.startswith(b"HTTP/1.1 408") and b"within 1 s" in reply and seconds < 3, (reply, seconds)
    reply, seconds = exchange(limited_server, head(10**9), b"")
    assert reply.startswith(b"HTTP/1.1 413") and b"the limit is 1000" in reply and seconds < 3
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n"
    reply, _ = exchange(limited_server, chunked, b"")
    assert reply.startswith(b"HTTP/1.1 413") and b"over the limit of 1000" in reply  # no Content-Length: counted
    reply, _ = exchange(limited_server, head(5).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), b"hello")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"bytes":5}')
