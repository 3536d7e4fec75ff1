"""The Serve application's settings: one frozen dataclass, the source of `python -m serve`'s
flags and of `serve/config.yaml`'s `args`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> anything clip_models.load accepts
    index: str | None = None  # image features from jobs/embed.py (JSONL / Parquet / shard dir)
    index_metadata: str | None = None  # optional JSONL of {"image_id": ..., ...} returned with search hits
    index_images: str | None = None  # optional cn_clip {split}_imgs.tsv: GET /images/{id} serves the hits' images
    max_items: int = 32  # texts, images or labels per request
    max_image_bytes: int = 10 * 2**20  # per image, after base64 decoding
    max_image_pixels: int = 40_000_000  # decompression bombs are refused before decoding
    max_text_chars: int = 1000  # longer texts (and filled prompts) are refused; tokens beyond context_length are cut
    max_prompts: int = 1024  # /classify: labels x templates per request
    request_body_timeout_s: float = 30.0  # a request's body must arrive within this; slower clients get 408
    context_length: int = 52  # token limit per text, [CLS] and [SEP] included
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
        if self.max_batch_size < 1 or self.max_image_batch_size < 1 or self.max_models_per_replica < 1:
            raise ValueError("max_batch_size, max_image_batch_size and max_models_per_replica must be >= 1")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0 (0: one per reserved CPU)")
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
    for context_length tokens) and the index files are there, so a mistake is one line rather
    than replicas failing to start."""
    from clip_platform.config import check_model

    for source in config.checkpoints.values():
        check_model(source, config.context_length)
    for flag, path, is_there in (("--index", config.index, Path.exists), ("--index-images", config.index_images,
                                                                          Path.is_file)):
        if path and not is_there(Path(path)):
            raise FileNotFoundError(f"{flag} {path} does not exist" if not Path(path).exists() else
                                    f"{flag} {path} is not a file")
