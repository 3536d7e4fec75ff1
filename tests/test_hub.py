"""Released-checkpoint download: resume, the size/sha256 record and its checks on later
use, and the offline message, against a real HTTP server on 127.0.0.1 (no internet)."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading

import pytest
import torch

import clip_models
from clip_models import hub


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests_seen: list = []

    def do_GET(self):
        start = 0
        if (header := self.headers.get("Range")):
            start = int(header.split("=")[1].split("-")[0])
        self.requests_seen.append(start)
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tiny_vit, tmp_path):
    path = clip_models.export_cn_clip(tiny_vit, tmp_path / "src.pt")
    RangeHandler.payload = path.read_bytes()
    RangeHandler.requests_seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/clip_cn_tiny.pt"
    httpd.shutdown()


def test_download_resumes_and_records_size_and_sha256(server, monkeypatch, tmp_path, tiny_vit):
    monkeypatch.setitem(hub.RELEASES, "Tiny", hub.Release(server))
    cache = tmp_path / "cache"
    cache.mkdir()
    half = len(RangeHandler.payload) // 2
    (cache / "clip_cn_tiny.pt.part").write_bytes(RangeHandler.payload[:half])  # an interrupted earlier try
    model, preprocess = clip_models.load("Tiny", download_root=cache)
    assert RangeHandler.requests_seen == [half]
    assert (cache / "clip_cn_tiny.pt").read_bytes() == RangeHandler.payload
    assert not (cache / "clip_cn_tiny.pt.part").exists()
    entry = json.loads((cache / "clip_cn_tiny.pt.sha256").read_text())
    assert entry["size"] == len(RangeHandler.payload)
    assert entry["sha256"] == hashlib.sha256(RangeHandler.payload).hexdigest()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), tiny_vit.encode_image(images))
    clip_models.load("Tiny", download_root=cache)  # cached: no new request
    assert RangeHandler.requests_seen == [half]


@pytest.fixture
def cached(server, monkeypatch, tmp_path):
    """A complete download in the cache, with its record."""
    monkeypatch.setitem(hub.RELEASES, "Tiny", hub.Release(server))
    return hub.fetch("Tiny", download_root=tmp_path / "cache")


def test_a_truncated_cache_file_is_an_error_naming_what_to_delete(cached):
    cached.write_bytes(RangeHandler.payload[:-10])
    with pytest.raises(clip_models.CheckpointError, match=f"Delete {cached} and clip_cn_tiny.pt.sha256") as info:
        clip_models.load("Tiny", download_root=cached.parent)
    assert f"{len(RangeHandler.payload) - 10} bytes" in str(info.value)


def test_changed_bytes_of_the_same_size_fail_the_sha256(cached):
    damaged = bytearray(RangeHandler.payload)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte; writing it changes the mtime
    cached.write_bytes(bytes(damaged))
    with pytest.raises(clip_models.CheckpointError, match="sha256 differs"):
        hub.fetch("Tiny", download_root=cached.parent)


def test_a_touched_but_intact_file_passes_and_its_record_follows(cached, monkeypatch):
    stat = cached.stat()
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    hashed = []
    monkeypatch.setattr(hub, "_sha256", lambda path: hashed.append(path) or hashlib.sha256(path.read_bytes()).hexdigest())
    assert hub.fetch("Tiny", download_root=cached.parent) == cached
    assert hub.fetch("Tiny", download_root=cached.parent) == cached
    assert hashed == [cached]  # hashed once, after the mtime changed; the size alone the second time
    assert json.loads(hub.sidecar_path(cached).read_text())["mtime_ns"] == stat.st_mtime_ns + 10**9


def test_offline_message_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    # Port 9 (discard) on loopback refuses the connection, as an offline machine would.
    monkeypatch.setitem(hub.RELEASES, "Unreachable", hub.Release("http://127.0.0.1:9/checkpoints/clip_cn_vit-b-16.pt"))
    with pytest.raises(RuntimeError) as info:
        hub.fetch("Unreachable", download_root=tmp_path)
    message = str(info.value)
    assert "curl -L -C - -o" in message and str(tmp_path / "clip_cn_vit-b-16.pt") in message
    assert "http://127.0.0.1:9/checkpoints/clip_cn_vit-b-16.pt" in message


def test_released_names_point_at_the_cn_clip_files():
    assert hub.RELEASES["ViT-B-16"].url.endswith("/clip_cn_vit-b-16.pt")
    assert hub.RELEASES["RN50"].filename == "clip_cn_rn50.pt"


def test_qa_clip_names_resolve_to_their_cached_files(tiny_rn, tmp_path):
    """QA-CLIP ships cn_clip's checkpoint layout; a file already in the cache is used as is."""
    release = hub.RELEASES["QA-CLIP-ViT-B-16"]
    assert release.url == "https://huggingface.co/TencentARC/QA-CLIP/resolve/main/QA-CLIP-base.pt"
    path = clip_models.export_cn_clip(tiny_rn, tmp_path / release.filename)
    model, _ = clip_models.load("QA-CLIP-ViT-B-16", download_root=tmp_path)
    assert model.config == tiny_rn.config
    # A file found in the cache has no record yet: it gets one at first use, checked from then on.
    assert json.loads(hub.sidecar_path(path).read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
