"""Zero-shot classification: cn_clip's zeroshot_evaluation.py on Ray Data.

reader  -> the data plane's `read_labels` and `read_zeroshot` (`test/<label id>/*`
           images, in the order cn_clip's ImageFolder lists them);
mapper  -> the classifier's `decode_images` (CPU tasks: the data plane's decode_batch) then
           `ImageClassifier` (actor pool: the embed job's image encoder, loaded once per
           actor on the chosen --backend) turns images into class probabilities;
writer  -> `write_elevater_json` writes the ELEVATER-style JSON cn_clip writes.

The classifier is cn_clip's, in clip_platform.encode.classifier (shared with Serve's /classify
and training's zero-shot validation): one
embedding per class, the normalised mean of the normalised embeddings of that class's
prompts (templates.py); probabilities are softmax(100 * normalised image feature @ class
embeddings).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import clip_models

from .. import config as config_io
from ..data import read_labels, read_zeroshot, zeroshot_images
from ..encode.backends import BACKENDS, check_backend
from ..encode.classifier import class_embeddings, decode_images, probabilities
from ..encode.encoder import IMAGE, ModelEncoder
from ..encode.precision import ENCODER_PRECISIONS
from ..encode.templates import load_templates
from ..io import write_lines
from ..ray_context import ensure_ray

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ZeroShotConfig:
    datapath: str  # test folder: one sub-folder per class, named by its (zero-padded) label id
    label_file: str  # label_cn.txt: class name of label i on line i + 1
    save_dir: str = "."  # <save_dir>/<dataset>.json is written
    dataset: str = "imagenet"  # dataset name in the JSON and the file name
    resume: str | None = None  # checkpoint, anything clip_models.load accepts; default: the released --vision-model
    vision_model: str | None = None  # name in "CN-CLIP-<name>"; default: inferred from the checkpoint
    text_model: str | None = None  # accepted for cn_clip's command lines; the checkpoint defines the model
    precision: Literal[ENCODER_PRECISIONS] = "amp"  # amp/fp32: fp32 as cn_clip's zero-shot; bf16/fp16: autocast; int8: int8 graphs (CPU)
    img_batch_size: int = 64  # images per batch
    context_length: int = 52  # prompt token limit, [CLS] and [SEP] included
    num_workers: int = 4  # CPU decode tasks in flight (cn_clip: data-loader workers)
    concurrency: int = 1  # encoder actors, each holding one model
    num_gpus: float = 0.0  # GPUs per encoder actor (0: CPU)
    index: str = ""  # cn_clip's --index: a JSON list of row positions that reorders the outputs
    templates: str = ""  # prompt templates, one per line with {}; default: the built-in Chinese set
    backend: Literal[BACKENDS] = "torch"  # what encodes the images: torch, onnxruntime, openvino (ONNX graphs), or auto

    def __post_init__(self):
        if self.precision not in ENCODER_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {self.precision!r}")
        check_backend(self.backend, self.precision)
        if not self.resume and self.vision_model not in clip_models.available_models():
            raise ValueError(f"--resume is required unless --vision-model names a released model "
                             f"({', '.join(clip_models.available_models())})")
        for name in ("img_batch_size", "context_length", "num_workers", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must not be negative, got {self.num_gpus}")
        if self.context_length < 3:
            raise ValueError("context_length must leave room for [CLS], [SEP] and one token")
        config_io.check_output(self.save_dir, "--save-dir", directory=True)
        config_io.check_output(str(Path(self.save_dir) / f"{self.dataset}.json"), "the output of --dataset")


@dataclass(frozen=True)
class ZeroShotResult:
    top1: float  # fraction of images whose most probable class is right
    top5: float  # fraction with the right class among the 5 most probable
    num_images: int  # images classified
    num_classes: int
    skipped: tuple[str, ...]  # unreadable images, left out
    output: str  # the ELEVATER JSON


# ---------------------------------------------------------------- classifier

def model_source(config: ZeroShotConfig) -> str:
    return config.resume or config.vision_model


class ImageClassifier:
    """Actor-pool stage: the image encoder, loaded once, then images -> class probabilities."""

    def __init__(self, source: str, classifier: np.ndarray, precision: str, backend: str = "torch"):
        self.encoder = ModelEncoder(source, (IMAGE,), precision, backend)
        self.classifier = torch.tensor(classifier)  # a copy: Ray hands in a read-only array

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        probs = np.zeros((len(ok), self.classifier.shape[1]), np.float32)
        if ok.any():
            features = self.encoder.encode_images(batch["image"][ok])
            probs[ok] = probabilities(torch.from_numpy(features), self.classifier).numpy()
        return {"label": batch["label"], "path": batch["path"], "probs": probs, "ok": ok, "error": batch["error"]}


def classify_images(datapath: str, num_classes: int, source: str, classifier: np.ndarray, image_size: int,
                    config: ZeroShotConfig) -> dict[str, np.ndarray]:
    """Probabilities [N, C] in ImageFolder order for the images of `datapath`, with their
    labels, paths (relative to the test folder) and whether they could be read."""
    import ray

    ensure_ray()
    _, root, infos = zeroshot_images(datapath, num_classes)
    num_blocks = max(1, min(len(infos) // config.img_batch_size, 4 * config.num_workers * config.concurrency))
    ds = read_zeroshot(datapath, num_classes=num_classes, override_num_blocks=num_blocks,
                       concurrency=config.num_workers)
    ds = ds.map_batches(decode_images, fn_kwargs={"image_size": image_size}, batch_size=config.img_batch_size,
                        batch_format="numpy", num_cpus=1, compute=ray.data.TaskPoolStrategy(size=config.num_workers))
    ds = ds.map_batches(ImageClassifier, fn_constructor_args=(source, classifier, config.precision, config.backend),
                        batch_size=config.img_batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                        num_gpus=config.num_gpus or None, num_cpus=0 if config.num_gpus else 1)
    parts = list(ds.select_columns(["label", "path", "probs", "ok", "error"])
                 .iter_batches(batch_size=None, batch_format="numpy"))
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    # Tasks finish in any order: put the rows back in the folder's order, as cn_clip reports them.
    position = {info.path[len(root) + 1:]: i for i, info in enumerate(infos)}
    order = np.argsort([position.get(str(p), -1) for p in merged["path"]], kind="stable")
    return {key: value[order] for key, value in merged.items()}


# ---------------------------------------------------------------- scoring and writer

def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among their k most probable classes."""
    if not len(labels):
        return float("nan")
    top = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, probs.shape[1])]
    return float((top == labels[:, None]).any(axis=1).mean())


def read_index(path: str, num_rows: int) -> list[int]:
    """cn_clip's --index file: a JSON list of row positions."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"index file {file} does not exist")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"index file {file} is not JSON: {exc.msg}") from None
    if not isinstance(index, list) or not all(isinstance(i, int) and 0 <= i < num_rows for i in index):
        raise ValueError(f"index file {file} must be a JSON list of positions in 0..{num_rows - 1}")
    return index


def json_prec_dump(data, prec: int = 6) -> str:
    """cn_clip's float rounding for the ELEVATER JSON."""
    return json.dumps(json.loads(json.dumps(data), parse_float=lambda x: round(float(x), prec)))


def elevater_json(model: clip_models.CLIP, model_name: str, dataset: str, probs: np.ndarray) -> dict:
    num_params = sum(p.numel() for p in model.parameters())
    return {
        "model_name": "CN-CLIP-" + model_name,
        "dataset_name": dataset,
        "num_trainable_params": 0,
        "num_params": num_params,
        "num_visual_params": sum(p.numel() for p in model.visual.parameters()),
        "num_backbone_params": num_params,
        "n_shot": 0,
        "rnd_seeds": [123],
        "predictions": [probs.tolist()],
    }


def write_elevater_json(path: str | os.PathLike, payload: dict) -> str:
    return write_lines(path, [json_prec_dump(payload)])


# ---------------------------------------------------------------- the job

def zeroshot(config: ZeroShotConfig) -> ZeroShotResult:
    classnames = read_labels(config.label_file)
    _, _, images = zeroshot_images(config.datapath, len(classnames))  # checks the folder before any work
    templates = load_templates(config.templates)
    index = read_index(config.index, len(images)) if config.index else None
    source = model_source(config)
    model, _ = clip_models.load(source, device="cuda" if torch.cuda.is_available() else "cpu")
    model_name = config.vision_model or model.config.struct_name().split("@")[0]
    log.info("zero-shot %s: %d images, %d classes, %d templates, model %s", config.dataset, len(images),
             len(classnames), len(templates), model_name)
    classifier = class_embeddings(model, classnames, templates, config.context_length).cpu().numpy()

    result = classify_images(config.datapath, len(classnames), source, classifier, model.image_size, config)
    ok = result["ok"].astype(bool)
    skipped = tuple(str(p) for p in result["path"][~ok])
    for path, error in zip(result["path"][~ok], result["error"][~ok]):
        log.warning("skipped %s: %s", path, error)
    if index is not None and skipped:
        raise ValueError(f"--index needs every image, but {len(skipped)} could not be read (first: {skipped[0]})")
    probs, labels = result["probs"][ok], result["label"][ok].astype(np.int64)
    if index is not None:
        probs, labels = probs[index], labels[index]
    output = Path(config.save_dir) / f"{config.dataset}.json"
    write_elevater_json(output, elevater_json(model, model_name, config.dataset, probs))
    outcome = ZeroShotResult(topk_accuracy(probs, labels, 1), topk_accuracy(probs, labels, 5), len(labels),
                             len(classnames), skipped, str(output))
    log.info("zeroshot-top1: %.4f, zeroshot-top5: %.4f over %d images (%d skipped) -> %s", outcome.top1,
             outcome.top5, outcome.num_images, len(skipped), output)
    return outcome
