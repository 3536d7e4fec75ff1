"""`make demo`: the platform end to end on an embedded local Ray, from configs/demo.yaml."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_io



@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "demo_output"  # everything the demo writes goes here
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticConfig fields
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    retrieval: dict[str, Any] = field(default_factory=dict)  # RetrievalEvalConfig fields for the test split
    serve_port: int = 8000  # the smoke query's Serve HTTP port on 127.0.0.1

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")


def make_data(config: DemoConfig) -> Path:
    from .data import SyntheticConfig, make_synthetic

    out = Path(config.output_dir) / "data"
    if (out / "lmdb" / "valid" / "pairs").is_dir():
        print(f"[1/4] synthetic dataset: reusing {out}")
        return out
    make_synthetic(config_io.build(SyntheticConfig, {"lmdb": True, **config.synthetic}, {"output_dir": str(out)}))
    print(f"[1/4] synthetic dataset written to {out}")
    return out


def finetune(config: DemoConfig, data: Path):
    from .train import TrainConfig, run_finetune

    paths = {"train_data": str(data / "lmdb" / "train"), "val_data": str(data / "lmdb" / "valid"),
             "logs": str(Path(config.output_dir) / "logs")}
    result = run_finetune(config_io.build(TrainConfig, config.finetune, paths))
    m = result.final_metrics
    print(f"[2/4] finetuned: validation text→image R@1 {m.get('valid_t2i_r1', float('nan')):.1f}  "
          f"R@5 {m.get('valid_t2i_r5', float('nan')):.1f}  image→text R@1 {m.get('valid_i2t_r1', float('nan')):.1f}  "
          f"mean recall {m.get('valid_mean_recall', float('nan')):.1f}")
    print(f"      checkpoint (cn_clip layout): {result.checkpoint}\n      curves: {result.plot}\n"
          f"      logs: {result.run_dir}")
    return result


def retrieval(config: DemoConfig, data: Path, checkpoint: Path) -> dict:
    from .batch.retrieval import RetrievalEvalConfig, format_table, retrieval_eval

    out = Path(config.output_dir) / "retrieval" / "test"
    summary = retrieval_eval(config_io.build(RetrievalEvalConfig, {"split": "test", **config.retrieval},
                                             {"data_dir": str(data), "output_dir": str(out),
                                              "resume": str(checkpoint)}))
    print("[3/4] test split: embed -> KNN both ways -> cn_clip recall\n" + format_table(summary))
    return summary


def index_images(config: DemoConfig) -> Path:
    """The test split's image features as a persistent index (jobs/build_index.py's code): what Serve searches."""
    import shutil

    from .index import IndexConfig
    from .index.build import build_index

    features = Path(config.output_dir) / "retrieval" / "test" / "features" / "images"
    out = Path(config.output_dir) / "index" / "test_images"
    shutil.rmtree(out, ignore_errors=True)  # the features were just written again: a new build, not a resumed one
    report = build_index(IndexConfig(str(features), str(out)))
    print(f"      index of the test images: {out} ({report.factory}, {report.count} vectors)")
    return out


def serve_smoke(config: DemoConfig, checkpoint: Path, index: Path) -> list[dict]:
    """Start the Serve app on 127.0.0.1, ask one search and one classification, stop it."""
    import requests
    from ray import serve

    from serve.app import ServeConfig, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": config.serve_port})
    try:
        serve.run(build_app(ServeConfig(checkpoints={"demo": str(checkpoint)}, index=str(index), max_replicas=1)),
                  name="clip", route_prefix="/")
        url = f"http://127.0.0.1:{config.serve_port}"
        query = "左上角有一个红色的圆形"
        hits = requests.post(url + "/search", json={"text": query, "top_k": 3}, timeout=120).json()["results"]
        print(f"[4/4] Serve smoke query on {url}: /search {query!r} -> "
              + ", ".join(f"image {h['id']} ({h['score']:.3f})" for h in hits))
        return hits
    finally:
        serve.shutdown()


def run_demo(config: DemoConfig) -> dict[str, float]:
    timings: dict[str, float] = {}

    def timed(name, stage, *args):
        start = time.perf_counter()
        out = stage(*args)
        timings[name] = time.perf_counter() - start
        return out

    data = timed("data", make_data, config)
    result = timed("finetune", finetune, config, data)
    summary = timed("retrieval", retrieval, config, data, result.checkpoint)
    index = timed("index", index_images, config)
    timed("serve", serve_smoke, config, result.checkpoint, index)
    print(f"\nDemo finished in {sum(timings.values()):.0f}s ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")")
    print(f"validation mean recall {result.final_metrics.get('valid_mean_recall', float('nan')):.1f}; "
          f"test mean recall {summary['mean_recall']:.1f} (text→image R@1 {summary['t2i']['r1']:.1f}, "
          f"image→text R@1 {summary['i2t']['r1']:.1f})")
    return timings
