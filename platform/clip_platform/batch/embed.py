"""Corpus embedding: cn_clip's extract_features.py over the cluster, resumable.

reader  -> `embed_source`: Ray Data reads the corpus (LMDB imgs dir, TSV, image
           files, Parquet, webdataset; texts JSONL or webdataset captions) through
           the data plane's sources as deterministic shards, rows tagged with
           their shard, finished shards not read at all;
mapper  -> `decode_rows` (CPU tasks: the data plane's decode_batch, bad records
           kept as flagged rows) then `Encoder` (actor pool, model loaded once per
           actor, GPUs when present, bf16/fp16 autocast when asked);
writer  -> `embed_store`: the driver assembles finished shards and writes each
           atomically as Parquet or cn_clip JSONL, then optionally merges them into
           cn_clip's single feature JSONL (normalised features, as cn_clip).

Texts are normalised as cn_clip's datasets do (lowercase, curly quotes) by the
data plane, and each batch is padded to its longest member rather than to
--context-length: padding is masked, so the features are the same.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import clip_models
from clip_models._torch_compat import inductor_freezing

from .. import config as config_io
from ..data import decode_batch
from ..data.records import BadRecord
from ..io import write_json
from .embed_source import IMAGES, MARKER_ROW, TEXTS, CorpusPlan, Modality, ShardedDatasource, plan_corpus, \
    record_to_dict
from .embed_store import FORMATS, FinishedShard, ShardAssembler, ShardStore
from .precision import PRECISIONS, autocast, fast_linears
from .runtime import ensure_ray, node_id

log = logging.getLogger(__name__)

DEFAULT_IMAGE_DATA = "../Multimodal_Retrieval/lmdb/test/imgs"  # cn_clip's defaults
DEFAULT_TEXT_DATA = "../Multimodal_Retrieval/test_texts.jsonl"
STAGE_CPUS = 0.5  # logical CPUs of a read or decode task: light next to the encoder
BLOCKS_PER_STORE = 32  # pipeline blocks are at most 1/32 of the smallest node's object store
CPU_IMAGE_BATCH = 16  # at most this many images per batch on CPU encoders (see build_dataset)
PROGRESS_SECONDS = 15.0  # at most this long between progress lines
COMPILE_CHOICES = ("auto", "on", "off")
# --compile auto: CPU image encoders compile when each has at least this many images. ViT-B-16
# bf16, 2 cores, in the job: ~7.7 images/s compiled against ~6.6 eager once running, after
# ~17 s compiling; whole job on 1024 images 6.61/s against 6.36/s. Break-even ~800 images.
COMPILE_MIN_IMAGES = 1000


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
    precision: Literal[PRECISIONS] = "amp"  # amp/fp32: fp32 as cn_clip; bf16/fp16: autocast
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

    def __post_init__(self):
        if not (self.extract_image_feats or self.extract_text_feats):
            raise ValueError("nothing to do: give --extract-image-feats and/or --extract-text-feats")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
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
        config_io.check_output(self.image_feat_output_path, "--image-feat-output-path")
        config_io.check_output(self.text_feat_output_path, "--text-feat-output-path")
        config_io.check_output(self.output_dir, "--output-dir", directory=True)

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


# ---------------------------------------------------------------- outputs

@dataclass(frozen=True)
class Target:
    """One modality to embed: its input, shard folder, format and merged JSONL."""

    modality: Modality
    data: str
    shards_dir: Path
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
            out.append(Target(modality, data, Path(config.output_dir) / modality.name, config.format, explicit,
                              True, batch_size))
        else:
            jsonl = explicit or default
            out.append(Target(modality, data, Path(f"{jsonl}.parts"), "jsonl", jsonl, False, batch_size))
    return out


# ---------------------------------------------------------------- the model, seen from the driver

@dataclass(frozen=True)
class ModelInfo:
    source: str  # what each encoder actor loads
    name: str  # e.g. ViT-B-16@RoBERTa-wwm-ext-base-chinese
    image_size: int
    embed_dim: int
    fingerprint: dict[str, Any]  # identifies the weights, so a resume never mixes two models


def inspect_model(source: str) -> ModelInfo:
    """Read the checkpoint once on the driver: a bad --resume fails here in one line,
    and the decode stage learns the input size without building the model."""
    path = clip_models.resolve(source)
    state, config, _ = clip_models.read_checkpoint(path, mmap=True)  # shapes only: no need to read the weights
    config = config or clip_models.infer_config(state)
    del state
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    fingerprint = {"source": str(source), "name": config.struct_name(),
                   "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]}
    return ModelInfo(str(source), config.struct_name(), config.vision.image_size, config.embed_dim, fingerprint)


# ---------------------------------------------------------------- mapper: decode (CPU tasks)

def decode_rows(batch: dict[str, np.ndarray], modality: Modality, image_size: int,
                context_length: int) -> dict[str, np.ndarray]:
    """Read rows -> model inputs, every row kept: records that fail to decode and the
    end-of-shard markers come out with `ok` False (and the reason in `note`), so the
    writer can account for every row of a shard."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    # Images stay uint8 pixels (a quarter of float32's bytes through the object store);
    # the encoder normalises them, with the same float32 arithmetic as cn_clip's transform.
    decoded, bad = decode_batch({modality.id_key: batch[modality.id_key], modality.payload: batch[modality.payload]},
                                clip_models.image_transform(image_size, pixels=True), context_length,
                                (modality.id_key,), todo=batch["row"] != MARKER_ROW)
    out = {key: batch[key] for key in (modality.id_key, "path", "shard", "row")}
    out["note"] = batch["note"].astype(object)
    out["ok"] = decoded["valid"]
    for position, record in bad.items():
        name = str(batch["path"][position])  # a file's or a key's name says more than its hashed id
        named = BadRecord(record.kind, name, record.where, record.detail) if name else record
        out["note"][position] = json.dumps(record_to_dict(named))
    if modality == IMAGES:
        out["image"] = decoded["image"]
    else:
        out["tokens"] = decoded["tokens"]
        out["num_tokens"] = decoded["num_tokens"]
    return out


# ---------------------------------------------------------------- mapper: encode (actor pool)

def normalise(features: torch.Tensor) -> np.ndarray:
    return clip_models.normalize_features(features.float()).cpu().numpy()


def encode_images(model: clip_models.CLIP, images: np.ndarray, precision: str = "fp32",
                  forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Normalised float32 features [N, D] of images [N, 3, S, S]: uint8 pixels (normalised
    by the model, in float32) or preprocessed floats. `forward` replaces model.encode_image
    (e.g. `compiled_image_forward`)."""
    device = next(model.parameters()).device
    array = np.array(images)  # a copy: Ray's arrays are read-only
    pixels = torch.from_numpy(array if array.dtype == np.uint8 else array.astype(np.float32, copy=False))
    with torch.no_grad(), autocast(precision, device):
        return normalise((forward or model.encode_image)(pixels.to(device)))


def compiled_image_forward(model: clip_models.CLIP, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """model.encode_image through torch.compile for inference: the weights are frozen as
    constants (on CPU, pre-packed for oneDNN: most of the gain) and short batches are padded
    to `batch_size`, so one graph serves the whole corpus. The model must not be trained after.
    None (encode eagerly) when this torch lacks inductor's freezing (a private API, warned once)."""
    freezing = inductor_freezing()
    if freezing is None:
        return None
    compiled = torch.compile(model.encode_image, dynamic=False)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        if n < batch_size:
            pixels = torch.cat([pixels, pixels.new_zeros((batch_size - n, *pixels.shape[1:]))])
        with freezing():  # this graph only (it compiles on the first call)
            return compiled(pixels)[:n]

    return forward


def encode_texts(model: clip_models.CLIP, tokens: np.ndarray, num_tokens: np.ndarray | None = None,
                 precision: str = "fp32") -> np.ndarray:
    """Normalised float32 features [N, D] of token ids [N, L], cut to the longest text of the batch."""
    device = next(model.parameters()).device
    width = int(num_tokens.max()) if num_tokens is not None and len(num_tokens) else tokens.shape[1]
    ids = torch.from_numpy(np.array(tokens[:, :max(width, 1)], np.int64)).to(device)
    with torch.no_grad(), autocast(precision, device):
        return normalise(model.encode_text(ids))


class Encoder:
    """Actor-pool stage: loads the model once, then model inputs -> normalised features.
    Each row also says which node encoded it (`node`), for the report."""

    def __init__(self, source: str, modality: Modality, precision: str, threads: int = 0,
                 compile_batch: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = clip_models.load(source, device=self.device)
        self.modality, self.precision = modality, precision
        self.node = node_id()
        # Images only: text batches vary in length (each padded to its longest), which a
        # static graph would recompile for.
        self.forward = compiled_image_forward(self.model, compile_batch) \
            if compile_batch and modality == IMAGES else None
        # Eager forward passes (the compiled graph packs its own weights).
        self.linears = self._fast_linears() if self.forward is None else contextlib.nullcontext()

    def _fast_linears(self):
        tower = self.model.visual if self.modality == IMAGES else self.model.bert
        return fast_linears(tower, self.precision, self.device)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        try:
            return encode_images(self.model, images, self.precision, self.forward)
        except Exception as error:  # noqa: BLE001 - e.g. a node without a C++ compiler for inductor
            if self.forward is None:
                raise
            log.warning("torch.compile failed on node %s, encoding without it: %s", self.node, error)
            self.forward, self.linears = None, self._fast_linears()
            with self.linears:
                return encode_images(self.model, images, self.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        features = np.zeros((len(ok), self.model.config.embed_dim), np.float32)
        if ok.any():
            with self.linears:
                if self.modality == IMAGES:
                    features[ok] = self.encode_images(batch["image"][ok])
                else:
                    features[ok] = encode_texts(self.model, batch["tokens"][ok], batch["num_tokens"][ok],
                                                self.precision)
        out = {key: batch[key] for key in (self.modality.id_key, "path", "shard", "row", "note")}
        out["ok"], out["feature"] = ok, features
        out["node"] = np.full(len(ok), self.node, object)
        return out


# ---------------------------------------------------------------- resources

@dataclass(frozen=True)
class EncoderResources:
    concurrency: int  # encoder actors
    num_gpus: float  # per actor
    num_cpus: float  # logical CPUs per actor
    threads: int  # torch threads per actor (0: torch's default)
    store_bytes: float = 0.0  # object store of the smallest node


def encoder_resources(config: EmbedConfig) -> EncoderResources:
    """GPU clusters: one actor per GPU. CPU clusters: one actor per node using all its cores
    (measured on 2 cores, ViT-B-16 bf16, 192 images: 31-34 s, against 50-56 s for two
    1-thread actors; 1024 texts: 15.6 s against 29-32 s). Its logical CPU request leaves
    room for the read and decode tasks, which would otherwise wait forever behind actors
    holding every CPU."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise ValueError("the Ray cluster has no node with CPUs")
    store = min(n.get("object_store_memory", 0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if total_gpus else 0.0)
    if num_gpus:
        if num_gpus > max(n.get("GPU", 0) for n in nodes):
            raise ValueError(f"--num-gpus {num_gpus} per encoder actor, but no node has that many GPUs")
        concurrency = config.concurrency or max(1, int(total_gpus // num_gpus))
        return EncoderResources(concurrency, num_gpus, 1.0, config.threads, store)
    node_cpus = int(min(n["CPU"] for n in nodes))
    default_per_node = max(1, node_cpus // config.threads) if config.threads else 1
    concurrency = config.concurrency or default_per_node * len(nodes)
    per_node = math.ceil(concurrency / len(nodes))
    threads = config.threads or max(1, node_cpus // per_node)
    share = (node_cpus - STAGE_CPUS) / per_node
    return EncoderResources(concurrency, 0.0, round(min(share, max(STAGE_CPUS, threads - 1)), 3), threads, store)


# ---------------------------------------------------------------- the pipeline

def build_dataset(plan: CorpusPlan, todo: list[int], target: Target, config: EmbedConfig, model: ModelInfo,
                  resources: EncoderResources, compiled: bool):
    """reader -> decode tasks -> encoder actors, streaming."""
    import ray

    batch_size = target.batch_size
    if target.modality == IMAGES and not resources.num_gpus:
        # CPU encoders: small batches keep the activations in cache (ViT-B-16, 1 thread: 4.3
        # images/s at 16 a batch, 4.0 at 32), and a small corpus still reaches every actor.
        batch_size = min(batch_size, CPU_IMAGE_BATCH)

    # One block stream per shard: more blocks would only be split off to reach a default parallelism.
    ds = ray.data.read_datasource(ShardedDatasource(plan.pieces, todo, target.modality), num_cpus=STAGE_CPUS,
                                  override_num_blocks=len(todo))
    ds = ds.map_batches(decode_rows, fn_kwargs={"modality": target.modality, "image_size": model.image_size,
                                                "context_length": config.context_length},
                        batch_size=batch_size, batch_format="numpy", num_cpus=STAGE_CPUS)
    # Ray Data spreads the pool's actors over the nodes (its default scheduling strategy).
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={
        "source": model.source, "modality": target.modality, "precision": config.precision,
        "threads": resources.threads,
        "compile_batch": batch_size if compiled else 0},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency), num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None)
    # Blocks small next to the object store (this dataset's context only): Ray Data otherwise
    # packs decoded batches into blocks of up to 128 MiB, and a few of those fill a small store
    # and spill (measured: 1.9 of 2.5 GiB spilled through a 256 MiB store). Images: decoded
    # blocks of exactly one batch, as a block goes to one task or actor and a corpus of few
    # blocks would keep all but one busy. The target is the batch's pixel bytes alone: a row
    # is a little bigger (ids, bookkeeping), and Ray cuts a block at ceil(target / row bytes)
    # rows, so a target with room for the extras gave blocks of batch + 1, run as a batch and
    # a 1-image batch (a whole padded batch when compiled). Texts keep bigger blocks: one per
    # batch cost them a third of their speed (1024 texts: 21 s against 15.6 s).
    block_bytes = max(1 << 20, resources.store_bytes / BLOCKS_PER_STORE)
    if target.modality == IMAGES:
        block_bytes = min(block_bytes, batch_size * 3 * model.image_size ** 2)
    ds.context.target_max_block_size = int(min(ds.context.target_max_block_size, block_bytes))
    return ds


def compile_images(config: EmbedConfig, resources: EncoderResources, plan: CorpusPlan, todo: list[int],
                   target: Target) -> bool:
    """--compile on/off, or auto: CPU image encoders with COMPILE_MIN_IMAGES images each
    (GPU encoders: not measured, so not by default)."""
    if target.modality != IMAGES or config.compile == "off":
        return False
    if config.compile == "on":
        return True
    per_actor = plan.estimated_rows * len(todo) / max(1, plan.num_shards) / resources.concurrency
    return not resources.num_gpus and per_actor >= COMPILE_MIN_IMAGES


class Progress:
    """Log lines with counts and throughput: one per finished shard, and one every
    PROGRESS_SECONDS while a shard is still filling."""

    def __init__(self, name: str, num_todo: int):
        self.name, self.num_todo = name, num_todo
        self.start = self.last = time.perf_counter()
        self.num_encoded = self.num_skipped = self.num_shards = 0
        self.nodes: set[str] = set()  # nodes whose encoders delivered rows

    def rows(self, batch: dict[str, np.ndarray]) -> None:
        self.num_encoded += int(np.asarray(batch["ok"]).sum())
        self.nodes.update(np.unique(np.asarray(batch["node"]).astype(str)).tolist())
        if time.perf_counter() - self.last > PROGRESS_SECONDS:
            self._log("encoding")

    def shard(self, shard: FinishedShard) -> None:
        self.num_shards += 1
        self.num_skipped += len(shard.bad_records)
        self._log(f"shard {shard.shard} written ({len(shard.features)} features, {len(shard.bad_records)} skipped)")

    @property
    def rate(self) -> float:
        return self.num_encoded / max(1e-9, time.perf_counter() - self.start)

    def _log(self, what: str) -> None:
        self.last = time.perf_counter()
        log.info("%s: %s; %d/%d shards, %d encoded, %.1f/s, %d skipped", self.name, what, self.num_shards,
                 self.num_todo, self.num_encoded, self.rate, self.num_skipped)


def run_shards(plan: CorpusPlan, todo: list[int], store: ShardStore, target: Target, config: EmbedConfig,
               model: ModelInfo, resources: EncoderResources, compiled: bool) -> Progress:
    """Embed the shards `todo`, writing each as soon as its last row is encoded."""
    progress = Progress(target.modality.name, len(todo))
    assembler = ShardAssembler(target.modality)
    batches = build_dataset(plan, todo, target, config, model, resources, compiled).iter_batches(
        batch_size=None, batch_format="numpy")
    try:
        for batch in batches:
            progress.rows(batch)
            for shard in assembler.add(batch):
                store.write(shard, plan.num_shards)
                progress.shard(shard)
    finally:
        if hasattr(batches, "close"):
            batches.close()  # stops the pipeline (and frees its actors) when the loop is left by an error
    if assembler.pending:
        raise RuntimeError(f"{target.modality.name}: shards {sorted(assembler.pending)} ended incomplete")
    return progress


# ---------------------------------------------------------------- resuming

def run_settings(target: Target, config: EmbedConfig, model: ModelInfo) -> dict[str, Any]:
    """What the features depend on besides the input: a resumed run must match it."""
    settings = {"model": model.fingerprint, "precision": config.precision, "format": target.format}
    if target.modality == TEXTS:
        settings["context_length"] = config.context_length
    return settings


def prepare_plan(store: ShardStore, target: Target, config: EmbedConfig, model: ModelInfo) -> CorpusPlan:
    """The shards of this input: those of the folder's plan when it is the same run
    (resume), else a new plan; shards of another input or model stop the job
    unless --overwrite."""
    settings = _json_roundtrip(run_settings(target, config, model))
    saved = store.load_plan()
    if saved is not None:
        plan = plan_corpus(target.data, target.modality, config.rows_per_shard, saved.get("requested"))
        differs = [name for name, now in (("input", _json_roundtrip(plan.fingerprint)), ("settings", settings))
                   if saved.get(name) != now]
        if not differs:
            return plan
        if not config.overwrite:
            what = " and ".join("input files" if d == "input" else "model or settings" for d in differs)
            raise ValueError(f"{store.directory} holds shards of another run (different {what}); "
                             "use another output folder, or --overwrite to replace them")
        log.warning("%s: replacing the shards of another run", store.directory)
        store.clear()
    plan = plan_corpus(target.data, target.modality, config.rows_per_shard)
    store.save_plan({"modality": target.modality.name, "requested": plan.requested, "num_shards": plan.num_shards,
                     "input": plan.fingerprint, "settings": settings})
    return plan


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------- the job

def embed_target(target: Target, config: EmbedConfig, model: ModelInfo, resources: EncoderResources) -> EmbedReport:
    start = time.perf_counter()
    store = ShardStore(target.shards_dir, target.modality, target.format)
    plan = prepare_plan(store, target, config, model)
    done = store.finished(plan.num_shards)
    todo = [i for i in range(plan.num_shards) if i not in done]
    compiled = compile_images(config, resources, plan, todo, target)
    log.info("%s: %s -> %s: %d shards, %d finished earlier, %d to embed with %d encoder actor(s) "
             "(%s GPU, %s CPU, %s threads each%s)", target.modality.name, target.data, store.directory,
             plan.num_shards, len(done), len(todo), resources.concurrency, resources.num_gpus, resources.num_cpus,
             resources.threads or "default", "; torch.compile first, then the first batch" if compiled else "")
    progress = run_shards(plan, todo, store, target, config, model, resources, compiled) if todo else None
    encode_seconds = time.perf_counter() - start
    store.drop_duplicate_ids(plan.num_shards)
    num_features, skipped = store.summary(plan.num_shards)
    output = None
    if target.jsonl:
        num_lines = store.merge_jsonl(plan.num_shards, target.jsonl)
        output = target.jsonl
        log.info("%s: %d features written to %s", target.modality.name, num_lines, output)
    num_encoded = progress.num_encoded if progress else 0
    report = EmbedReport(target.modality.name, num_features, num_encoded, plan.num_shards, len(done),
                         skipped.num_bad, skipped.to_dict(), str(store.directory) if target.keep_shards else None,
                         output, time.perf_counter() - start, num_encoded / max(1e-9, encode_seconds),
                         len(progress.nodes) if progress else 0)
    if target.keep_shards:
        write_json(store.directory / "_summary.json", asdict(report))
    else:
        shutil.rmtree(store.directory, ignore_errors=True)
    log.info("%s: %d features (%d encoded now, %.1f/s, on %d node(s)); %s", target.modality.name, num_features,
             num_encoded, report.per_second, report.num_nodes, skipped)
    return report


def embed(config: EmbedConfig) -> list[EmbedReport]:
    """Embed the requested corpora; one report per modality (texts first, as cn_clip)."""
    model = inspect_model(config.model_source)
    log.info("model %s from %s, precision %s", model.name, model.source, config.precision)
    ensure_ray()
    resources = encoder_resources(config)
    return [embed_target(target, config, model, resources) for target in targets(config)]
