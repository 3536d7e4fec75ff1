"""The Serve application on a real local Ray, HTTP on 127.0.0.1 with two tiny models:
every endpoint's happy path and bad inputs, batching across callers, model multiplexing,
`python -m serve` with Serve's direct ingress, and the web page in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import clip_models
from clip_platform.data.features import Features
from clip_platform.encode.templates import load_templates
from conftest import TINY_VIT, start_local_ray
from helpers import load_job, write_features_jsonl

pytestmark = pytest.mark.slow
BODY_TIMEOUT_S = 2.0  # the service's request_body_timeout_s
SERVICE_CHECKPOINTS: dict[str, str] = {}  # filled by the service fixture
MODELS: dict[str, clip_models.CLIP] = {}  # the same models, in this process
INDEXES: dict[str, str] = {}  # the service's index directory and its tmp folder


def png(colour="red", size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_png(seed: int, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
IMAGES = {100 + i: png(c) for i, c in enumerate(COLOURS)} | {106 + i: noise_png(i) for i in range(34)}
TEXTS = {5000 + i: t for i, t in enumerate(["红色的圆形", "蓝色的正方形", "绿色的三角形", "一只猫", "北京的夜景",
                                            "左上角有一个绿色的圆形", "黄色的星星", "黑白照片", "雪山", "大海"])}


def image_features(model, images: list[bytes]) -> np.ndarray:
    preprocess = clip_models.image_transform(model.image_size)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
        return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()


def text_features(model, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(clip_models.tokenize(texts)), dim=-1).numpy()


def build_index(folder: Path, features: Features, checkpoint: str | None, **options) -> str:
    """An index over `features` as the embed job writes them (a Parquet shard and, when
    `checkpoint` is given, the _plan.json recording its model), built by jobs/build_index.py's code."""
    from clip_platform.model_info import inspect_model
    from clip_platform.data.features import write_features_parquet
    from clip_platform.index import IndexConfig
    from clip_platform.index.build import build_index as build

    write_features_parquet(folder / "features" / "part-00000.parquet", features, row_group_rows=16)
    if checkpoint:
        plan = {"settings": {"model": inspect_model(checkpoint).fingerprint, "precision": "fp32"}}
        (folder / "features" / "_plan.json").write_text(json.dumps(plan))
    build(IndexConfig(str(folder / "features"), str(folder / "index"), rows_per_shard=16, **options))
    return str(folder / "index")


@pytest.fixture(scope="module")
def service(tmp_path_factory, _ray_session):
    from ray import serve

    from serve.app import ServeConfig, build_app

    start_local_ray()
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = clip_models.create_model(TINY_VIT).eval()
    checkpoint = clip_models.save_checkpoint(model, root / "tiny.pt")
    torch.manual_seed(1)  # a second, different checkpoint: multiplexed beside the first
    other = clip_models.create_model(TINY_VIT).eval()
    other_checkpoint = clip_models.save_checkpoint(other, root / "other.pt")
    ids = np.array(list(IMAGES), np.int64)
    index = build_index(root / "images", Features(ids, image_features(model, list(IMAGES.values()))), str(checkpoint),
                        num_shards=2)
    # Built before Serve starts: a build's training task asks for every CPU of a node.
    texts = Features(np.array(list(TEXTS), np.int64), text_features(model, list(TEXTS.values())))
    INDEXES["texts"] = build_index(root / "texts", texts, str(checkpoint))
    (root / "test_imgs.tsv").write_bytes(  # with three malformed lines, skipped and counted as the batch jobs do
        "".join(f"{i}\t{b64(data)}\n" for i, data in IMAGES.items()).encode()
        + b"not-an-id\tAAAA\none field only\n\xff\xfe\t\xff\n")
    port = free_port()
    SERVICE_CHECKPOINTS.update(tiny=str(checkpoint), other=str(other_checkpoint))
    config = ServeConfig(checkpoints=dict(SERVICE_CHECKPOINTS), index=index, index_images=str(root / "test_imgs.tsv"),
                         max_items=8, max_image_bytes=200_000, max_image_pixels=1_000_000, max_replicas=1,
                         num_cpus=0.25, search_cpus=0.1, request_body_timeout_s=BODY_TIMEOUT_S,
                         context_length=128)  # long texts (cn_clip's #409): the tiny text tower has 512 positions
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="clip", route_prefix="/")
    MODELS.update(tiny=model, other=other)
    INDEXES.update(images=index, root=str(root))  # and "texts", above
    yield f"http://127.0.0.1:{port}", model
    serve.shutdown()


def post(service, path, **kwargs):
    return requests.post(service[0] + path, timeout=60, **kwargs)


def test_health_models_docs_and_page(service):
    url, _ = service
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok", "index": 40, "images": 40,
                                                                 "images_skipped": 3}
    models = requests.get(url + "/models", timeout=30).json()
    assert models["default"] == "tiny" and set(models["models"]) == {"tiny", "other"}
    assert requests.get(url + "/docs", timeout=30).status_code == 200
    assert "以文搜图" in requests.get(url + "/", timeout=30).text


def test_embed_text_equals_the_model_and_reports_truncation(service):
    _, model = service
    texts = ["一只猫", "猫" * 50 + "狗" * 50, "猫" * 200]  # served with --context-length 128: 102 tokens fit, 202 not
    reply = post(service, "/embed/text", json={"texts": texts})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(clip_models.tokenize(texts, 128)), dim=-1)
        cut_at_52 = torch.nn.functional.normalize(model.encode_text(clip_models.tokenize(texts[1:2])), dim=-1)[0]
    torch.testing.assert_close(torch.tensor(body["embeddings"]), expected, atol=1e-5, rtol=0)
    assert (expected[1] - cut_at_52).abs().max() > 1e-3  # the dogs past token 52 count: the whole text was read
    assert body["truncated"] == [False, False, True]


def test_embed_image_json_and_multipart(service):
    _, model = service
    as_json = post(service, "/embed/image", json={"images": [b64(png("red"))]}).json()["embeddings"][0]
    as_upload = post(service, "/embed/image", files=[("images", ("a.png", png("red"), "image/png"))]).json()
    with torch.no_grad():
        pixels = clip_models.image_transform(model.image_size)(Image.open(io.BytesIO(png("red"))))[None]
        expected = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0]
    torch.testing.assert_close(torch.tensor(as_json), expected, atol=1e-5, rtol=0)
    assert as_upload["embeddings"][0] == pytest.approx(as_json, abs=1e-6)


def test_openai_style_embeddings_mix_texts_and_images(service):
    body = post(service, "/v1/embeddings", json={"input": ["红色", "data:image/png;base64," + b64(png())]}).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert all(abs(np.linalg.norm(d["embedding"]) - 1) < 1e-4 for d in body["data"])


def test_classify_and_search(service):
    probs = post(service, "/classify", json={"image": b64(png("blue")), "labels": ["红色", "蓝色", "绿色"],
                                              "templates": ["一张{}的图片", "{}"]}).json()["probs"]
    assert len(probs) == 3 and sum(probs) == pytest.approx(1, abs=1e-5)
    reply = post(service, "/search", json={"image": b64(png("green")), "top_k": 3}).json()
    hits = reply["results"]
    assert reply["model"] == "tiny" and hits[0]["id"] == 101 and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    assert hits[0]["metadata"] == {"file": str(Path(INDEXES["root"]) / "images" / "features" / "part-00000.parquet"),
                                   "row": 1}  # from the index's id table
    assert [h["score"] for h in hits] == sorted([h["score"] for h in hits], reverse=True)
    assert len(post(service, "/search", json={"text": "绿色", "top_k": 4}).json()["results"]) == 4
    assert hits[0]["image_url"] == "images/101"
    image = requests.get(service[0] + "/images/101", timeout=30)
    assert image.headers["content-type"] == "image/png" and image.content == png("green")
    assert requests.get(service[0] + "/images/999", timeout=30).status_code == 404


# ---------------------------------------------------------------- search on the persistent index

def test_search_over_a_two_shard_index_equals_the_knn_job(service, tmp_path):
    """Two Search deployments, one index shard each, fanned out and merged by the Gateway:
    the ids `jobs/knn.py --index` finds for the same text queries, asked one by one and all
    at once with two top_k (each Search replica answers the requests waiting together in one
    FAISS call per top_k)."""
    from ray import serve

    manifest = json.loads((Path(INDEXES["images"]) / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and all(shard["count"] for shard in manifest["shards"])
    assert {"Search0", "Search1"} <= set(serve.status().applications["clip"].deployments)
    texts = Features(np.array(list(TEXTS), np.int64), text_features(MODELS["tiny"], list(TEXTS.values())))
    write_features_jsonl(tmp_path / "texts.jsonl", texts, "text_id")
    load_job("knn").main(["--text-feats", str(tmp_path / "texts.jsonl"), "--index", INDEXES["images"],
                          "--output", str(tmp_path / "predictions.jsonl"), "--top-k", "7"])
    expected = {line["text_id"]: line["image_ids"] for line in map(json.loads, open(tmp_path / "predictions.jsonl"))}
    for text_id, text in TEXTS.items():
        hits = post(service, "/search", json={"text": text, "top_k": 7}).json()["results"]
        assert [h["id"] for h in hits] == expected[text_id], text
    asked = [(text_id, text, 7 if n % 2 else 3) for n, (text_id, text) in enumerate(TEXTS.items())] * 3
    with ThreadPoolExecutor(len(asked)) as pool:
        replies = list(pool.map(lambda a: post(service, "/search", json={"text": a[1], "top_k": a[2]}), asked))
    for (text_id, text, k), reply in zip(asked, replies):
        assert [h["id"] for h in reply.json()["results"]] == expected[text_id][:k], (text, k)


def test_more_like_this_finds_the_item_itself_first(service):
    for item in (100, 103, 120, 139):
        hits = post(service, "/search", json={"image_id": item, "top_k": 3}).json()["results"]
        assert hits[0]["id"] == item and hits[0]["score"] > 0.999, hits  # the stored vector is float16
        assert hits[0]["image_url"] == f"images/{item}"
    missing = post(service, "/search", json={"image_id": 99999})
    assert missing.status_code == 404 and "no item 99999" in missing.text
    other = post(service, "/search", json={"image_id": 100, "model": "other"})
    assert other.status_code == 400 and "holds features of model 'tiny'" in other.text


def test_an_index_of_another_model_is_refused_one_without_a_model_served_with_a_warning(service, tmp_path, caplog):
    from serve.config import ServeConfig, check_inputs
    from serve.config import index_model

    manifest = json.loads((Path(INDEXES["images"]) / "manifest.json").read_text())

    def index_with(name: str, **changes) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        return str(tmp_path / name)

    tiny, other = SERVICE_CHECKPOINTS["tiny"], SERVICE_CHECKPOINTS["other"]
    with pytest.raises(ValueError, match="holds features of ViT-Tiny.* not of a served checkpoint: other"):
        check_inputs(ServeConfig(checkpoints={"other": other}, index=INDEXES["images"]))
    assert index_model(ServeConfig(checkpoints={"other": other, "tiny": tiny}, index=INDEXES["images"])) == "tiny"
    with caplog.at_level("WARNING", logger="serve"):
        assert index_model(ServeConfig(checkpoints={"other": other}, index=index_with("unknown", model=None))) == "other"
    assert "records no model" in caplog.text
    with pytest.raises(ValueError, match="holds 7-dimensional vectors"):
        index_model(ServeConfig(checkpoints={"tiny": tiny}, index=index_with("dim", dim=7)))
    with pytest.raises(FileNotFoundError, match="no finished index"):
        index_model(ServeConfig(checkpoints={"tiny": tiny}, index=str(tmp_path)))
    done = subprocess.run([sys.executable, "-m", "serve", "--checkpoint", other, "--index", INDEXES["images"]],
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "RAY_ADDRESS": "local"},
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "not of a served checkpoint" in lines[0], done.stderr


def test_a_text_index_searched_by_the_gateway_answers_text_image_and_more_like_this_queries(service):
    """search_replicas 0: no Search deployment; the Gateway maps the shards and searches itself."""
    from ray import serve

    from serve.app import ServeConfig, build_app

    config = ServeConfig(checkpoints={"tiny": SERVICE_CHECKPOINTS["tiny"]}, index=INDEXES["texts"], max_replicas=1,
                         num_cpus=0.25, search_replicas=0)
    serve.run(build_app(config), name="texts", route_prefix="/texts")
    try:
        assert set(serve.status().applications["texts"].deployments) == {"Gateway", "Encoder"}
        url = (service[0] + "/texts", None)
        for text_id, text in TEXTS.items():  # text -> text: each text finds itself
            assert post(url, "/search", json={"text": text, "top_k": 3}).json()["results"][0]["id"] == text_id
        hits = post(url, "/search", json={"image": b64(png("red")), "top_k": 4}).json()["results"]  # image -> text
        assert len(hits) == 4 and {h["id"] for h in hits} <= set(TEXTS) and "image_url" not in hits[0]
        assert post(url, "/search", json={"text_id": 5003, "top_k": 2}).json()["results"][0]["id"] == 5003
    finally:
        serve.delete("texts")


def test_classify_gives_the_zero_shot_jobs_probabilities(service):
    """Same image, labels and checkpoint: /classify and the zero-shot job's classifier and
    mapper (its default Chinese templates and precision) agree to 1e-4."""
    from clip_platform.batch.zeroshot import ImageClassifier, ZeroShotConfig
    from clip_platform.encode.classifier import class_embeddings, decode_images

    labels = ["红色的圆形", "蓝色的正方形", "绿色的三角形", "一只猫"]
    checkpoint = SERVICE_CHECKPOINTS["other"]
    model, _ = clip_models.load(checkpoint)
    job = ZeroShotConfig(datapath=".", label_file="labels.txt", resume=checkpoint)
    classifier = class_embeddings(model, labels, load_templates(job.templates), job.context_length).numpy()
    mapper = ImageClassifier(checkpoint, classifier, job.precision)
    for seed in range(3):
        image = noise_png(seed)
        batch = {"image_id": np.array([f"{seed}.png"]), "label": np.array([0]), "image": np.array([image], dtype=object)}
        expected = mapper(decode_images(batch, model.image_size))["probs"][0]
        reply = post(service, "/classify", json={"image": b64(image), "labels": labels, "model": "other"})
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(reply.json()["probs"], expected, atol=1e-4, rtol=0)
        assert expected.max() - expected.min() > 1e-3  # the labels are told apart: not a trivial agreement


@pytest.mark.parametrize("path, payload, status, message", [
    ("/embed/text", {"texts": [""]}, 422, "non-empty"),
    ("/embed/text", {"texts": []}, 422, "at least 1"),
    ("/embed/text", {"texts": ["a"] * 9}, 413, "limit is 8"),
    ("/embed/text", {"texts": ["a"], "model": "nope"}, 404, "unknown model"),
    ("/embed/text", {"texts": ["x" * 2000]}, 413, "limit"),
    ("/embed/image", {"images": ["%%%not base64"]}, 422, "base64"),
    ("/embed/image", {"images": [b64(b"plain text, not an image")]}, 400, "not a readable image"),
    ("/embed/image", {"images": [b64(png(size=(2000, 2000)))]}, 400, "over the limit"),
    ("/embed/image", {"images": [b64(b"x" * 300_000)]}, 413, "larger than"),
    ("/embed/image", {"images": "not a list"}, 422, "list"),
    ("/search", {"text": "a", "image": b64(png())}, 422, "exactly one"),
    ("/search", {"text": "a", "top_k": 0}, 422, "greater than"),
    ("/classify", {"image": b64(png()), "labels": ["a"], "templates": ["no placeholder"]}, 422, "{}"),
    ("/v1/embeddings", {"input": ["a", "data:image/png;base64,%%"]}, 422, "base64"),
    ("/v1/embeddings", {"input": ["a"], "encoding_format": "hex"}, 422, "base64"),
    ("/embed/text", {"wrong": 1}, 422, ""),
])
def test_bad_inputs_are_4xx_with_a_message(service, path, payload, status, message):
    reply = post(service, path, json=payload)
    assert reply.status_code == status, reply.text
    assert message in reply.text


# ---------------------------------------------------------------- hostile requests

def assert_healthy(url: str) -> None:
    assert requests.get(url + "/healthz", timeout=30).status_code == 200
    assert post((url, None), "/embed/text", json={"texts": ["还活着吗"]}).status_code == 200


@pytest.mark.parametrize("templates, status", [
    (["{}{}"], 200), (["{}{"], 200), (["}{}{"], 200), (["{0.__class__}"], 422), (["{:>200000000}"], 422),
    (["{}", "{0.__class__}{}"], 200), (["{}" * 400], 413),  # 400 labels' worth of characters: over max_text_chars
    (["{}"] * 65, 422),  # more templates than a request may carry
])
def test_hostile_templates_are_filled_or_refused_never_formatted(service, templates, status):
    """The label replaces `{}`, nothing is str.format-ted: format specs and attribute lookups are
    plain text, and sizes are checked before a prompt is built (no 200 MB string)."""
    start = time.perf_counter()
    reply = post(service, "/classify", json={"image": b64(png()), "labels": ["猫", "狗" * 10], "templates": templates})
    assert reply.status_code == status, reply.text
    assert time.perf_counter() - start < 30
    if status == 200:
        assert len(reply.json()["probs"]) == 2
    assert_healthy(service[0])


def test_a_multipart_upload_whose_images_are_text_is_a_422(service):
    for fields in ({"images": "just text"}, {"image": "text"}):
        reply = post(service, "/embed/image", data=fields, files=[("model", (None, "tiny"))])
        assert reply.status_code == 422, reply.text
        assert "UploadFile" in reply.text or "at least 1" in reply.text
    mixed = post(service, "/embed/image", files=[("images", ("a.png", png(), "image/png")), ("images", (None, "text"))])
    assert mixed.status_code == 422 and "UploadFile" in mixed.text
    not_json = post(service, "/embed/image", data=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.text
    assert_healthy(service[0])


def slow_post(url: str, byte_interval_s: float, limit_s: float) -> tuple[bytes, float]:
    """POST a 1000-byte body one byte every `byte_interval_s` over a raw socket; the reply and
    the seconds until the server closed the connection (or `limit_s`)."""
    host, port = url.removeprefix("http://").split(":")
    start, reply = time.monotonic(), b""
    with socket.create_connection((host, int(port)), timeout=limit_s) as sock:
        sock.sendall(b"POST /embed/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        sock.settimeout(byte_interval_s)
        while time.monotonic() - start < limit_s:
            try:
                sock.sendall(b" ")
            except OSError:  # the server closed its side
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
    return reply, time.monotonic() - start


def test_a_body_sent_at_a_byte_a_second_is_cut_off(service):
    """Behind the proxy and on the Gateway replica's own port, a body that has not arrived
    within request_body_timeout_s is answered 408 and the connection closed."""
    from serve.app import gateway_urls

    proxy = service[0]
    urls = [proxy, *(u for u in gateway_urls("clip", "127.0.0.1", int(proxy.rsplit(":", 1)[1])) if u != proxy)]
    assert len(urls) == 2
    for url in urls:
        reply, seconds = slow_post(url, byte_interval_s=0.25, limit_s=BODY_TIMEOUT_S + 8)
        assert reply.startswith(b"HTTP/1.1 408"), (url, reply[:200])
        assert b"did not arrive within 2 s" in reply
        assert seconds < BODY_TIMEOUT_S + 4, (url, seconds)  # cut off, not held until the client gives up
        print(f"{url}: 408 and closed after {seconds:.1f} s")
    assert_healthy(proxy)


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(service):
    host, port = service[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /embed/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n{")
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"the limit is" in reply, reply[:300]
    assert_healthy(service[0])


def test_python_m_serve_stops_in_one_line_on_a_missing_or_corrupt_checkpoint(tmp_path):
    from serve.config import ServeConfig, check_inputs

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for checkpoint, message in ((tmp_path / "missing.pt", "not found"), (corrupt, "not a PyTorch checkpoint")):
        done = subprocess.run([sys.executable, "-m", "serve", "--checkpoint", str(checkpoint)], capture_output=True,
                              cwd=Path(__file__).resolve().parents[1], env={**os.environ, "RAY_ADDRESS": "local"},
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
        assert lines[0].startswith("python -m serve: error: ")  # the program as typed, not "__main__.py"
    checkpoint = str(clip_models.save_checkpoint(clip_models.create_model(TINY_VIT), tmp_path / "tiny.pt"))
    for images, message in ((tmp_path / "absent.tsv", "does not exist"), (tmp_path, "is not a file")):
        with pytest.raises(FileNotFoundError, match=message):
            check_inputs(ServeConfig(checkpoints={"a": checkpoint}, index_images=str(images)))


def test_concurrent_callers_share_batches(service):
    texts = [f"第{i}段文字" for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda t: post(service, "/embed/text", json={"texts": [t]}), texts))
    assert all(r.status_code == 200 for r in replies)
    seen = requests.get(service[0] + "/models", timeout=30).json()["max_batch_seen"]
    assert seen["text"] > 1  # @serve.batch gathered requests from different callers
    assert requests.get(service[0] + "/healthz", timeout=30).status_code == 200  # still serving after the burst


def test_overload_answers_fast_503s(service):
    from ray import serve

    from serve.app import ServeConfig, build_app, gateway_urls

    small = ServeConfig(checkpoints=dict(SERVICE_CHECKPOINTS), max_items=32, max_ongoing_requests=1,
                        max_queued_requests=1, max_replicas=1, num_cpus=0.25)
    serve.run(build_app(small), name="small", route_prefix="/small")
    try:
        proxy = service[0]
        (direct,) = gateway_urls("small", "127.0.0.1", int(proxy.rsplit(":", 1)[1]))
        assert direct != proxy  # the Gateway replica's own port: the same limits apply there
        texts = {"texts": [f"很长的一段用于制造负载的文字{i}" * 3 for i in range(32)]}
        for url in (proxy + "/small/embed/text", direct + "/small/embed/text"):
            with ThreadPoolExecutor(24) as pool:
                replies = list(pool.map(lambda _: requests.post(url, json=texts, timeout=120), range(24)))
            codes = [r.status_code for r in replies]
            assert 503 in codes and 200 in codes, (url, codes)
            rejected = [r.elapsed.total_seconds() for r in replies if r.status_code == 503]
            assert max(rejected) < 5  # refused at once, not after waiting in a pile
    finally:
        serve.delete("small")


def test_killed_replica_is_replaced_and_requests_keep_succeeding(service):
    import ray
    import time

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "Encoder" in a["name"] and a["name"].startswith("SERVE_REPLICA::clip")]
    assert names, "no Encoder replica found"
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    deadline, ok = time.time() + 90, 0
    while time.time() < deadline and ok < 3:
        try:
            reply = post(service, "/embed/text", json={"texts": ["恢复了吗"]})
            ok = ok + 1 if reply.status_code == 200 else 0
        except requests.RequestException:
            ok = 0
        time.sleep(0.5)
    assert ok == 3, "requests did not succeed again after the replica was killed"


# ---------------------------------------------------------------- model multiplexing

def expected_text(name: str, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(MODELS[name].encode_text(clip_models.tokenize(texts)), dim=-1)


def test_two_multiplexed_models_are_served_and_differ(service):
    models = requests.get(service[0] + "/models", timeout=60).json()
    assert set(models["models"]) == {"tiny", "other"} and models["max_models_per_replica"] >= 2
    assert all(info["struct"] and info["embed_dim"] for info in models["models"].values())
    texts = ["一只猫", "北京的夜景"]
    tiny = post(service, "/embed/text", json={"texts": texts, "model": "tiny"}).json()
    other = post(service, "/embed/text", json={"texts": texts, "model": "other"}).json()
    assert (tiny["model"], other["model"]) == ("tiny", "other")
    torch.testing.assert_close(torch.tensor(tiny["embeddings"]), expected_text("tiny", texts), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(other["embeddings"]), expected_text("other", texts), atol=1e-5, rtol=0)
    assert np.abs(np.array(tiny["embeddings"]) - np.array(other["embeddings"])).max() > 1e-2
    image = post(service, "/v1/embeddings", json={"input": ["data:image/png;base64," + b64(png())], "model": "other",
                                                  "encoding_format": "base64"}).json()["data"][0]["embedding"]
    with torch.no_grad():
        pixels = clip_models.image_transform(MODELS["other"].image_size)(Image.open(io.BytesIO(png())))[None]
        expected = torch.nn.functional.normalize(MODELS["other"].encode_image(pixels), dim=-1)[0]
    torch.testing.assert_close(torch.from_numpy(np.frombuffer(base64.b64decode(image), "<f4").copy()), expected,
                               atol=1e-5, rtol=0)


def test_concurrent_requests_for_two_models_are_batched_per_model(service):
    jobs = [(("tiny", "other")[i % 2], f"第{i}句话") for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: post(service, "/embed/text", json={"texts": [job[1]], "model": job[0]}),
                                jobs))
    for (name, text), reply in zip(jobs, replies):
        assert reply.status_code == 200, reply.text
        torch.testing.assert_close(torch.tensor(reply.json()["embeddings"][0]), expected_text(name, [text])[0],
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------- direct ingress: `python -m serve`

def test_python_m_serve_answers_on_the_gateway_replicas_own_port(tmp_path):
    """`python -m serve` on a Ray of its own turns Serve's direct ingress on: the Gateway replica
    serves HTTP on a port of its own (no proxy actor on the way) with the same answers as the
    proxy's port: embeddings, validation errors, the page. Its Encoder runs on --backend openvino
    (the checkpoint's ONNX graphs, exported by the replica): the model's features all the same."""
    torch.manual_seed(0)
    model = clip_models.create_model(TINY_VIT).eval()
    checkpoint = clip_models.save_checkpoint(model, tmp_path / "tiny.pt")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local",  # a new local Ray, never the test session's
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # quick shutdown: no balancer to drain
           "CLIP_GRAPH_CACHE": str(tmp_path / "graphs")}  # the replica's exported graphs, gone with the test
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "--checkpoint", str(checkpoint), "--port", str(port), "--max-replicas", "1",
         "--backend", "openvino"],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        deadline, seen = time.time() + 300, []
        while time.time() < deadline and not (seen and seen[-1].startswith("serving")):
            try:
                seen.append(lines.get(timeout=5))
            except queue.Empty:
                assert process.poll() is None, "".join(seen[-30:])
        assert seen and seen[-1].startswith("serving"), "".join(seen[-30:])
        found = re.search(r"direct ingress, no proxy hop: (http://[^;,\s]+)", seen[-1])
        assert found, seen[-1]
        direct, proxy = found.group(1), f"http://127.0.0.1:{port}"
        assert direct != proxy
        with torch.no_grad():
            expected = torch.nn.functional.normalize(model.encode_text(clip_models.tokenize(["一只猫"])), dim=-1)[0]
        for url in (direct, proxy):
            reply = requests.post(url + "/embed/text", json={"texts": ["一只猫"]}, timeout=60)
            assert reply.status_code == 200, reply.text
            torch.testing.assert_close(torch.tensor(reply.json()["embeddings"][0]), expected, atol=1e-5, rtol=0)
        reply = requests.post(direct + "/embed/image", json={"images": [b64(png("red")), b64(noise_png(3))]}, timeout=60)
        assert reply.status_code == 200, reply.text
        served, expected_images = np.array(reply.json()["embeddings"]), image_features(model, [png("red"), noise_png(3)])
        assert (served * expected_images).sum(1).min() >= 0.999
        np.testing.assert_allclose(served, expected_images, atol=1e-5)
        bad = requests.post(direct + "/embed/text", json={"texts": [""]}, timeout=60)
        assert bad.status_code == 422 and "non-empty" in bad.text
        assert "以文搜图" in requests.get(direct + "/", timeout=60).text
    finally:
        process.send_signal(signal.SIGINT)  # the CLI exits and Ray stops the processes it started
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


# ---------------------------------------------------------------- the web page in headless Chromium

def has_cjk_font() -> bool:
    try:
        return bool(subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return False


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installing Debian's packages when they are absent (and a
    Chinese font, so the screenshot shows the page's text rather than empty boxes)."""
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    packages = ([] if all(found()) else ["chromium", "chromium-driver"]) + ([] if has_cjk_font() else ["fonts-wqy-zenhei"])
    if packages and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        try:
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode:  # stale package lists: refresh once and retry
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
                done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            reason = done.stderr.strip()[-500:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = str(exc)
    else:
        reason = "no root apt-get to install them"
    if not all(found()):
        pytest.skip(f"chromium/chromedriver absent and could not be installed: {reason}")
    return found()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency (pip install -e .[dev])")
    chromium, chromedriver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # given explicitly, so Selenium Manager never downloads a browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,1700", "--lang=zh-CN"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def test_web_page_searches_and_classifies_in_headless_chromium(service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _ = service
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    assert "中文 CLIP" in browser.title
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)  # filled from GET /models
    assert "索引 40 条" in browser.find_element(By.ID, "health").text

    browser.find_element(By.ID, "query").send_keys("左上角有一个绿色的圆形")
    browser.find_element(By.ID, "search").click()
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit"))
    assert len(hits) == 8  # top_k 8 over the index's 40
    ids = [int(h.get_attribute("data-id")) for h in hits]
    expected = post(service, "/search", json={"text": "左上角有一个绿色的圆形", "top_k": 8}).json()["results"]
    assert ids == [h["id"] for h in expected]  # the index's answer, as the API gives it
    assert all(h.find_element(By.CLASS_NAME, "meta").text.startswith('{"file"') for h in hits)
    images = browser.find_elements(By.CSS_SELECTOR, "#results .hit img")
    assert len(images) == 8
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                             for img in images))  # the thumbnails really loaded from GET /images/{id}
    assert images[0].get_attribute("naturalWidth") in ("40", "48")  # a colour square or a noise image

    # Search by image: the file input takes a path; the green square's own image ranks first.
    picture = tmp_path / "green.png"
    picture.write_bytes(png("green"))
    browser.find_element(By.ID, "file").send_keys(str(picture))
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "preview")))
    browser.find_element(By.ID, "search-image").click()
    wait.until(expected_conditions.staleness_of(hits[0]))  # the text search's results were replaced
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit"))
    assert hits[0].get_attribute("data-id") == "101" and "相似度 1.000" in hits[0].text

    # More like this: the third hit's button searches with its stored vector; it comes first.
    third = hits[2].get_attribute("data-id")
    hits[2].find_element(By.CLASS_NAME, "more").click()
    wait.until(expected_conditions.staleness_of(hits[0]))
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit"))
    assert hits[0].get_attribute("data-id") == third and "相似度 1.000" in hits[0].text

    Select(browser.find_element(By.ID, "model")).select_by_value("other")
    browser.find_element(By.ID, "classify").click()
    wait.until(lambda d: "%" in d.find_element(By.ID, "probs").text)
    lines = browser.find_element(By.ID, "probs").text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["红色的圆形", "蓝色的正方形", "绿色的三角形"]
    assert sum(float(line.split(": ")[1].rstrip("%")) for line in lines) == pytest.approx(100, abs=0.5)

    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    copy = Path(__file__).resolve().parents[1] / "demo_output" / "serve_page.png"  # gitignored
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(screenshot, copy)
    print(f"\nscreenshot of the page: {screenshot} (copy: {copy})")
