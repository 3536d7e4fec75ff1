"""The embed job's options (cn_clip's extract_features.py flags and ours), its report, and
where each modality's features go."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import clip_models

from ... import config as config_io
from ...io import join
from ...encode.backends import BACKENDS, check_backend
from .source import IMAGES, TEXTS, Modality
from .store import FORMATS
from ...encode.precision import ENCODER_PRECISIONS

DEFAULT_IMAGE_DATA = "../Multimodal_Retrieval/lmdb/test/imgs"  # cn_clip's defaults
DEFAULT_TEXT_DATA = "../Multimodal_Retrieval/test_texts.jsonl"
COMPILE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class EmbedConfig:
    extract_image_feats: bool = False  # embed the images of --image-data
    extract_text_feats: bool = False  # embed the texts of --text-data
    image_data: str = DEFAULT_IMAGE_DATA  # LMDB imgs (or split) dir, *_imgs.tsv, Parquet (id, image), image files
    text_data: str = DEFAULT_TEXT_DATA  # texts JSONL: {"text_id": int, "text": str} per line
    image_feat_output_path: str | None = None  # cn_clip JSONL (default: next to --text-data, as cn_clip)
    text_feat_output_path: str | None = None  # cn_clip JSONL (default: <text-data>.txt_feat.jsonl, as cn_clip)
    img_batch_size: int = 64  # images per encoder batch (CPU encoders: at most 16)
    text_batch_size: int = 64  # texts per encoder batch, padded to the batch's longest
    context_length: int = 52  # token limit per text, [CLS] and [SEP] included
    resume: str | None = None  # checkpoint: anything clip_models.load accepts (cn_clip .pt, HF dir, ours)
    precision: Literal[ENCODER_PRECISIONS] = "amp"  # amp/fp32: fp32 as cn_clip; bf16/fp16: autocast; int8: int8 graphs (CPU)
    vision_model: str | None = None  # a released model name to load when --resume is not given
    text_model: str | None = None  # accepted for cn_clip's command lines; the checkpoint defines the model
    output_dir: str | None = None  # sharded output: <output-dir>/images and <output-dir>/texts
    format: Literal[FORMATS] = "parquet"  # format of the shards in --output-dir
    num_gpus: float | None = None  # GPUs per encoder actor (default: 1 when the cluster has GPUs, else 0)
    concurrency: int = 0  # encoder actors (0: one per GPU, or one per CPU node using its cores)
    threads: int = 0  # torch threads per CPU encoder actor (0: the node's CPUs shared by its actors)
    rows_per_shard: int = 10000  # records per shard: the unit of output files and of resuming
    overwrite: bool = False  # replace shards of another input or model instead of stopping
    compile: Literal[COMPILE_CHOICES] = "auto"  # torch.compile image encoders (auto: CPU ones given 1000+ images)
    backend: Literal[BACKENDS] = "torch"  # what encodes: torch, onnxruntime, openvino (ONNX graphs), or auto

    def __post_init__(self):
        if not (self.extract_image_feats or self.extract_text_feats):
            raise ValueError("nothing to do: give --extract-image-feats and/or --extract-text-feats")
        if self.precision not in ENCODER_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {self.precision!r}")
        check_backend(self.backend, self.precision)
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.resume and self.vision_model not in clip_models.available_models():
            raise ValueError(f"--resume is required unless --vision-model names a released model "
                             f"({', '.join(clip_models.available_models())})")
        for name in ("img_batch_size", "text_batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2 ([CLS] and [SEP]), got {self.context_length}")
        if (self.num_gpus or 0) < 0 or self.concurrency < 0 or self.threads < 0:
            raise ValueError("num_gpus, concurrency and threads must not be negative")
        if self.extract_text_feats and not self.text_feat_output_path and not self.output_dir \
                and not self.text_data.endswith(".jsonl"):
            raise ValueError(f"--text-data {self.text_data} does not end in .jsonl: give --text-feat-output-path")
        for flag, path, wanted in (("--text-data", self.text_data, self.extract_text_feats),
                                   ("--image-data", self.image_data, self.extract_image_feats)):
            if wanted:
                config_io.check_not_empty(path, flag)
        # Every output is written through clip_platform.io: local paths and URIs alike.
        config_io.check_output(self.image_feat_output_path, "--image-feat-output-path", uri=None)
        config_io.check_output(self.text_feat_output_path, "--text-feat-output-path", uri=None)
        config_io.check_output(self.output_dir, "--output-dir", directory=True, uri=None)

    @property
    def model_source(self) -> str:
        return self.resume or self.vision_model


@dataclass(frozen=True)
class EmbedReport:
    modality: str  # images or texts
    num_features: int  # features in the output
    num_encoded: int  # records encoded by this run (fewer than num_features when resuming)
    num_shards: int
    num_shards_reused: int  # finished by an earlier run and skipped
    num_skipped: int  # records skipped: unreadable, malformed, duplicate ids
    skipped: dict[str, Any]  # counts per kind and the first records of each kind (id, where, detail)
    shards_dir: str | None  # the shard folder (None once merged into `output` and removed)
    output: str | None  # cn_clip's JSONL, when one was written
    seconds: float  # this run, this modality
    per_second: float  # records encoded per second by this run, start-up included
    num_nodes: int = 0  # Ray nodes whose encoder actors encoded this run's records


@dataclass(frozen=True)
class Target:
    """One modality to embed: its input, shard folder, format and merged JSONL."""

    modality: Modality
    data: str
    shards_dir: str  # a local path or a URI
    format: str
    jsonl: str | None  # cn_clip JSONL written from the shards
    keep_shards: bool  # False: the shards only serve resuming, removed once merged
    batch_size: int


def default_image_output(text_data: str) -> str:
    # cn_clip's rule, verbatim: image features go next to the text file.
    return "{}.img_feat.jsonl".format(text_data.replace("_texts.jsonl", "_imgs"))


def default_text_output(text_data: str) -> str:
    return "{}.txt_feat.jsonl".format(text_data[:-6])


def targets(config: EmbedConfig) -> list[Target]:
    """With --output-dir: shards there (and a JSONL only where its path is given);
    without: cn_clip's JSONL at its (default) path, built from shards beside it."""
    wanted = []
    if config.extract_text_feats:
        wanted.append((TEXTS, config.text_data, config.text_feat_output_path,
                       default_text_output(config.text_data), config.text_batch_size))
    if config.extract_image_feats:
        wanted.append((IMAGES, config.image_data, config.image_feat_output_path,
                       default_image_output(config.text_data), config.img_batch_size))
    out = []
    for modality, data, explicit, default, batch_size in wanted:
        if config.output_dir:
            out.append(Target(modality, data, join(config.output_dir, modality.name), config.format, explicit,
                              True, batch_size))
        else:
            jsonl = explicit or default
            out.append(Target(modality, data, f"{jsonl}.parts", "jsonl", jsonl, False, batch_size))
    return out

