"""Bounded load test of the Serve text-embedding endpoint on loopback, against the
offline batch throughput of the same model on the same machine (measured in this run).

    python benchmarks/serve_load.py [--model ViT-Tiny@BERT-Tiny-chinese] [--clients 64] [--requests 2000]

Each request embeds one text (the common case for an online service). Prints
throughput, p50/p95/p99 latency, errors, and the ratio HTTP / offline (target >= 0.7).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

import clip_models


def offline_texts_per_s(model, texts: list[str], batch: int) -> float:
    """Texts/s of encode_text in batches, padded to the longest: what the replica does."""
    with torch.no_grad():
        model.encode_text(clip_models.tokenize(texts[:batch], pad_to_longest=True))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            model.encode_text(clip_models.tokenize(texts[i:i + batch], pad_to_longest=True))
    return len(texts) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import ray
    from ray import serve

    from serve.app import ServeConfig, build_app

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-Tiny@BERT-Tiny-chinese")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    texts = [f"第{i}张图片：一只在草地上奔跑的金色小狗" for i in range(args.requests)]
    model = clip_models.create_model(args.model).eval()
    offline = offline_texts_per_s(model, texts, 32)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = clip_models.save_checkpoint(model, Path(tmp) / "model.pt")
        ray.init(include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeConfig(checkpoints={"m": str(checkpoint)}, max_replicas=1,
                                        max_queued_requests=args.requests)), name="clip", route_prefix="/")
        url = f"http://127.0.0.1:{port}/embed/text"
        session = requests.Session()

        def one(text: str):
            start = time.perf_counter()
            try:
                ok = session.post(url, json={"texts": [text]}, timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            return ok, time.perf_counter() - start

        one("预热")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, texts))
        elapsed = time.perf_counter() - start
        serve.shutdown()
    latencies = sorted(t for _, t in results)
    errors = sum(not ok for ok, _ in results)
    quantile = statistics.quantiles(latencies, n=100)
    http = len(results) / elapsed
    print(f"{args.model}: {args.clients} clients, {len(results)} requests of 1 text, CPU {torch.get_num_threads()} threads")
    print(f"offline batch (32) : {offline:8.1f} texts/s")
    print(f"HTTP /embed/text   : {http:8.1f} texts/s  ratio {http / offline:.2f} (target >= 0.70)")
    print(f"latency p50 {quantile[49] * 1000:.0f} ms  p95 {quantile[94] * 1000:.0f} ms  "
          f"p99 {quantile[98] * 1000:.0f} ms  errors {errors}")


if __name__ == "__main__":
    main()
