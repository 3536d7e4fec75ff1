"""Encoder throughput of clip_models (SDPA attention, batch-first) against the
cn_clip 1.6.0 reference on the same random ViT-B-16 weights, CPU fp32.

    python benchmarks/model.py [--batch 8] [--repeats 3]
Prints images/s and texts/s of both and their ratio (same run, same machine).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import clip_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference loader lives with the tests
from cn_clip_ref import cn_clip_model  # noqa: E402


def rate(fn, items: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = clip_models.config_from_struct("ViT-B-16")
    reference = cn_clip_model(cfg)
    ours = clip_models.build_model(cfg, reference.state_dict()).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    texts = clip_models.tokenize(["一只在草地上奔跑的金色小狗"] * (args.batch * 8))
    with torch.no_grad():
        rows = [
            ("images/s", lambda m: (lambda: m.encode_image(images)), args.batch),
            ("texts/s (padded to 52)", lambda m: (lambda: m.encode_text(texts)), len(texts)),
        ]
        print(f"ViT-B-16 fp32 on CPU, {torch.get_num_threads()} threads")
        for name, make, items in rows:
            base, new = rate(make(reference), items, args.repeats), rate(make(ours), items, args.repeats)
            print(f"{name:<24} cn_clip {base:8.1f}   clip_models {new:8.1f}   ratio {new / base:.2f}x")


if __name__ == "__main__":
    main()
