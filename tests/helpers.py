"""Helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str):
    """jobs/{name}.py as a module (the jobs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_lmdb(out: Path, num_train: int = 128, num_valid: int = 1) -> Path:
    """A small synthetic dataset (32 px) with its LMDB splits; returns its lmdb/ directory."""
    from clip_platform.data import SyntheticConfig, make_synthetic

    make_synthetic(SyntheticConfig(str(out), num_train=num_train, num_valid=num_valid, num_test=8, resolution=32,
                                   lmdb=True, zeroshot_per_class=0))
    return out / "lmdb"


def sample_log(run_dir: Path) -> dict[int, list[int]]:
    """Sample indices per step of a run with record_sample_ids; the last record of each step
    counts (a restored run repeats the steps after its checkpoint)."""
    steps = {}
    for line in (run_dir / "sample_ids.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["indices"]
    return steps


def write_tar_shards(folder: Path, samples, per_shard: int = 4) -> list[Path]:
    """webdataset shards as img2dataset writes them: `{key}.jpg` / `{key}.txt` / `{key}.json`
    members, a sample's members together, `per_shard` samples per `{00000..}.tar`.
    `samples` are (key, image bytes or None, caption or None)."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, caption in samples[start:start + per_shard]:
                members = [("json", json.dumps({"key": key}).encode())]
                members += [("jpg", image)] if image is not None else []
                members += [("txt", caption.encode())] if caption is not None else []
                for extension, data in members:
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def write_features_jsonl(path: Path, features, id_key: str) -> Path:
    """cn_clip's feature JSONL (its extract_features.py output) from a Features block: the
    lines the embed job writes, as an input file for the KNN and Serve tests."""
    from clip_platform.data.features import jsonl_lines
    from clip_platform.io import write_lines

    write_lines(path, jsonl_lines(features, id_key))
    return path


def torch_features(tmp_path: Path, struct: str, images=None):
    """A seeded tiny model of `struct` saved as a checkpoint, four Chinese texts, and the torch
    backend's features of `images` (default: 5 random uint8 images) and of the texts:
    (checkpoint, model, images, (tokens, num_tokens), (image features, text features))."""
    import clip_models
    import numpy as np
    import torch

    from clip_platform.encode import ModelEncoder

    torch.manual_seed(0)
    model = clip_models.create_model(struct).eval()
    checkpoint = str(clip_models.save_checkpoint(model, tmp_path / "tiny.pt"))
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (5, 3, model.image_size, model.image_size), np.uint8)
    elif callable(images):
        images = images(model)
    tokens = clip_models.tokenize(["一只猫", "两只狗在草地上奔跑", "xyz", "北京的夜景很美"], 52).numpy()
    num_tokens = (tokens != 0).sum(1)
    reference = ModelEncoder(checkpoint, backend="torch")
    expected = reference.encode_images(images), reference.encode_texts(tokens, num_tokens)
    return checkpoint, model, images, (tokens, num_tokens), expected
