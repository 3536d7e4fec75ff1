"""The Serve application's settings: one frozen dataclass, the source of `python -m serve`'s
flags and of `serve/config.yaml`'s `args`; and the checks made before any replica starts
(`check_inputs`, `index_model`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clip_platform.encode.backends import BACKENDS, check_backend
from clip_platform.encode.precision import ENCODER_PRECISIONS

log = logging.getLogger("serve")


@dataclass(frozen=True)
class ServeConfig:
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> anything clip_models.load accepts
    index: str | None = None  # an index directory built by jobs/build_index.py, searched by POST /search
    search_groups: int = 0  # Search deployments the index shards are dealt over; 0: one per shard
    search_replicas: int = 1  # replicas of each Search deployment (each maps its group's shards); 0: no
    # Search deployment, each Gateway replica maps every shard and searches itself (one hop less per request)
    search_cpus: float = 0.5  # per Search replica
    index_images: str | None = None  # optional cn_clip {split}_imgs.tsv: GET /images/{id} serves the hits' images
    max_items: int = 32  # texts, images or labels per request
    max_image_bytes: int = 10 * 2**20  # per image, after base64 decoding
    max_image_pixels: int = 40_000_000  # decompression bombs are refused before decoding
    max_text_chars: int = 1000  # longer texts (and filled prompts) are refused; tokens beyond context_length are cut
    max_prompts: int = 1024  # /classify: labels x templates per request
    request_body_timeout_s: float = 30.0  # a request's body must arrive within this; slower clients get 408
    context_length: int = 52  # token limit per text, [CLS] and [SEP] included
    backend: Literal[BACKENDS] = "torch"  # what encodes: torch, onnxruntime, openvino (ONNX graphs), or auto
    precision: Literal[ENCODER_PRECISIONS] = "amp"  # amp/fp32: fp32 as cn_clip; bf16/fp16: autocast, or the runtime's; int8: int8 graphs (CPU)
    max_batch_size: int = 64  # texts per model batch (@serve.batch gathers them across requests)
    max_image_batch_size: int = 16  # images per model batch
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill once its first item arrived
    max_models_per_replica: int = 3  # @serve.multiplexed: checkpoints one Encoder replica keeps (LRU)
    torch_threads: int = 0  # intra-op threads per Encoder replica; 0: Ray's default, one per reserved CPU
    access_log: bool = True  # Serve's access-log line per request in each replica (costs CPU at high rates)
    min_replicas: int = 1  # Encoder replicas the autoscaler keeps
    max_replicas: int = 2  # Encoder replicas the autoscaler may start (equal to min_replicas: a fixed count)
    target_ongoing_requests: int = 8  # requests per Encoder replica the autoscaler aims at
    num_gpus: float = 0.0  # per Encoder replica; fractions share a GPU
    num_cpus: float = 1.0  # per Encoder replica
    max_ongoing_requests: int = 64  # requests a Gateway replica works on at once
    max_queued_requests: int = 256  # requests waiting for a Gateway replica; beyond this Serve answers 503 at once

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint (--checkpoint PATH or name=PATH)")
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        check_backend(self.backend, self.precision)
        if self.max_batch_size < 1 or self.max_image_batch_size < 1 or self.max_models_per_replica < 1:
            raise ValueError("max_batch_size, max_image_batch_size and max_models_per_replica must be >= 1")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0 (0: one per reserved CPU)")
        if self.search_groups < 0 or self.search_replicas < 0:
            raise ValueError("need search_groups >= 0 (0: one per index shard) and search_replicas >= 0 "
                             "(0: the Gateway searches)")
        if self.request_body_timeout_s <= 0:
            raise ValueError(f"request_body_timeout_s must be > 0, got {self.request_body_timeout_s}")
        for name in ("max_items", "max_image_bytes", "max_text_chars", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: max_items images of max_image_bytes in base64, and 1 MiB for the rest."""
        return self.max_items * -(-self.max_image_bytes * 4 // 3) + 2**20

    @property
    def default_model(self) -> str:
        return next(iter(self.checkpoints))


def check_inputs(config: ServeConfig) -> None:
    """Before any replica starts: every checkpoint is one clip_models can load (with positions
    for context_length tokens), the image TSV is there and the index is one of a served model,
    so a mistake is one line rather than replicas failing to start."""
    from clip_platform.config import check_model

    for source in config.checkpoints.values():
        check_model(source, config.context_length)
    if config.index_images and not Path(config.index_images).is_file():
        raise FileNotFoundError(f"--index-images {config.index_images} " + (
            "is not a file" if Path(config.index_images).exists() else "does not exist"))
    index_model(config)  # an index of another model, or no index at all, is refused here


def index_model(config: ServeConfig) -> str | None:
    """The served model whose features the index holds (None without an index). ValueError,
    in one line, when the index holds another model's features or vectors of another size.

    An index is searched with the model whose features it holds: the embed job records that
    model's fingerprint and the build copies it into the manifest. A served checkpoint of the
    same weights (clip_platform.model_info.same_model) is the index's model; an index of another
    model is refused; an index without a fingerprint is served with the default model and a
    warning."""
    if not config.index:
        return None
    from clip_platform.index.search import read_manifest
    from clip_platform.model_info import inspect_model, same_model

    manifest = read_manifest(config.index)
    models = {name: inspect_model(source) for name, source in config.checkpoints.items()}
    recorded = manifest.get("model")
    if recorded is None:
        name = config.default_model
        log.warning("the index %s records no model (its features were not written by jobs/embed.py): searched "
                    "with %r, whose features must be those it holds", config.index, name)
    else:
        name = next((n for n, info in models.items() if same_model(info.fingerprint, recorded)), None)
        if name is None:
            served = ", ".join(f"{n} ({info.name}, {info.source})" for n, info in models.items())
            raise ValueError(f"the index {config.index} holds features of {recorded.get('name')} "
                             f"({recorded.get('source')}), not of a served checkpoint: {served}")
    if models[name].embed_dim != manifest["dim"]:
        raise ValueError(f"the index {config.index} holds {manifest['dim']}-dimensional vectors; model {name!r} "
                         f"makes {models[name].embed_dim}")
    return name
