"""The Serve application on a real local Ray, HTTP on 127.0.0.1 with two tiny models:
every endpoint's happy path and bad inputs, batching across callers, model multiplexing,
`python -m serve` with Serve's direct ingress, and the web page in headless Chromium."""
from __future__ import annotations

import base64
import io
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
from clip_platform.batch.features import Features
from clip_platform.batch.templates import load_templates
from conftest import TINY_VIT, start_local_ray
from helpers import write_features_jsonl

pytestmark = pytest.mark.slow
BODY_TIMEOUT_S = 2.0  # the service's request_body_timeout_s
SERVICE_CHECKPOINTS: dict[str, str] = {}  # filled by the service fixture
MODELS: dict[str, clip_models.CLIP] = {}  # the same models, in this process


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
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    preprocess = clip_models.image_transform(model.image_size)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(png(c)))) for c in colours])
        vectors = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    write_features_jsonl(root / "index.jsonl", Features(np.arange(100, 106), vectors), "image_id")
    (root / "meta.jsonl").write_text("".join(f'{{"image_id": {100 + i}, "colour": "{c}"}}\n'
                                             for i, c in enumerate(colours)))
    (root / "test_imgs.tsv").write_bytes(  # with three malformed lines, skipped and counted as the batch jobs do
        "".join(f"{100 + i}\t{b64(png(c))}\n" for i, c in enumerate(colours)).encode()
        + b"not-an-id\tAAAA\none field only\n\xff\xfe\t\xff\n")
    port = free_port()
    SERVICE_CHECKPOINTS.update(tiny=str(checkpoint), other=str(other_checkpoint))
    config = ServeConfig(checkpoints=dict(SERVICE_CHECKPOINTS), index=str(root / "index.jsonl"),
                         index_metadata=str(root / "meta.jsonl"), index_images=str(root / "test_imgs.tsv"),
                         max_items=8, max_image_bytes=200_000, max_image_pixels=1_000_000, max_replicas=1,
                         num_cpus=0.25, request_body_timeout_s=BODY_TIMEOUT_S)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="clip", route_prefix="/")
    MODELS.update(tiny=model, other=other)
    yield f"http://127.0.0.1:{port}", model
    serve.shutdown()


def post(service, path, **kwargs):
    return requests.post(service[0] + path, timeout=60, **kwargs)


def test_health_models_docs_and_page(service):
    url, _ = service
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok", "index": 6, "images": 6,
                                                                 "images_skipped": 3}
    models = requests.get(url + "/models", timeout=30).json()
    assert models["default"] == "tiny" and set(models["models"]) == {"tiny", "other"}
    assert requests.get(url + "/docs", timeout=30).status_code == 200
    assert "以文搜图" in requests.get(url + "/", timeout=30).text


def test_embed_text_equals_the_model_and_reports_truncation(service):
    _, model = service
    reply = post(service, "/embed/text", json={"texts": ["一只猫", "猫" * 80]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(clip_models.tokenize(["一只猫"])), dim=-1)[0]
    torch.testing.assert_close(torch.tensor(body["embeddings"][0]), expected, atol=1e-5, rtol=0)
    assert body["truncated"] == [False, True]


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
    hits = post(service, "/search", json={"image": b64(png("green")), "top_k": 3}).json()["results"]
    assert hits[0]["id"] == 101 and hits[0]["metadata"]["colour"] == "green"
    assert [h["score"] for h in hits] == sorted([h["score"] for h in hits], reverse=True)
    assert len(post(service, "/search", json={"text": "绿色", "top_k": 4}).json()["results"]) == 4
    assert hits[0]["image_url"] == "images/101"
    image = requests.get(service[0] + "/images/101", timeout=30)
    assert image.headers["content-type"] == "image/png" and image.content == png("green")
    assert requests.get(service[0] + "/images/999", timeout=30).status_code == 404


def noise_png(seed: int, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_gives_the_zero_shot_jobs_probabilities(service):
    """Same image, labels and checkpoint: /classify and the zero-shot job's classifier and
    mapper (its default Chinese templates and precision) agree to 1e-4."""
    from clip_platform.batch.zeroshot import ImageClassifier, ZeroShotConfig, class_embeddings, decode_images

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
    proxy's port: embeddings, validation errors, the page."""
    torch.manual_seed(0)
    model = clip_models.create_model(TINY_VIT).eval()
    checkpoint = clip_models.save_checkpoint(model, tmp_path / "tiny.pt")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local",  # a new local Ray, never the test session's
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}  # quick shutdown: no balancer to drain
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "--checkpoint", str(checkpoint), "--port", str(port), "--max-replicas", "1"],
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
    assert "6" in browser.find_element(By.ID, "health").text

    browser.find_element(By.ID, "query").send_keys("左上角有一个绿色的圆形")
    browser.find_element(By.ID, "search").click()
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit"))
    assert len(hits) == 6  # top_k 8 over an index of 6
    ids = [int(h.get_attribute("data-id")) for h in hits]
    assert sorted(ids) == list(range(100, 106))
    assert all(h.find_element(By.CLASS_NAME, "meta").text.startswith('{"image_id"') for h in hits)
    images = browser.find_elements(By.CSS_SELECTOR, "#results .hit img")
    assert len(images) == 6
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                             for img in images))  # the thumbnails really loaded from GET /images/{id}
    assert images[0].get_attribute("naturalWidth") == "40"

    # Search by image: the file input takes a path; the green square's own image ranks first.
    picture = tmp_path / "green.png"
    picture.write_bytes(png("green"))
    browser.find_element(By.ID, "file").send_keys(str(picture))
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "preview")))
    browser.find_element(By.ID, "search-image").click()
    wait.until(expected_conditions.staleness_of(hits[0]))  # the text search's results were replaced
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit"))
    assert hits[0].get_attribute("data-id") == "101" and "相似度 1.000" in hits[0].text

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
