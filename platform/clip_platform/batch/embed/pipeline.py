"""The embed job's Ray Data pipeline: sharded reader -> decode tasks -> encoder actors, streamed
to the shard writer, with the actors sized to the cluster."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ...encode.backends import choose_backend
from ...model_info import ModelInfo
from ...ray_context import Gauges
from .source import IMAGES, CorpusPlan, ShardedDatasource
from .store import FinishedShard, ShardAssembler, ShardStore
from .config import EmbedConfig, Target
from .decode import decode_rows
from .actor import EmbedActor

log = logging.getLogger(__name__)

STAGE_CPUS = 0.5  # logical CPUs of a read or decode task: light next to the encoder
BLOCKS_PER_STORE = 32  # pipeline blocks are at most 1/32 of the smallest node's object store
CPU_IMAGE_BATCH = 16  # at most this many images per batch on CPU encoders (see build_dataset)
PROGRESS_SECONDS = 15.0  # at most this long between progress lines
# --compile auto: CPU image encoders compile when each has at least this many images. ViT-B-16
# bf16, 2 cores, in the job: ~7.7 images/s compiled against ~6.6 eager once running, after
# ~17 s compiling; whole job on 1024 images 6.61/s against 6.36/s. Break-even ~800 images.
COMPILE_MIN_IMAGES = 1000


@dataclass(frozen=True)
class EncoderResources:
    concurrency: int  # encoder actors
    num_gpus: float  # per actor
    num_cpus: float  # logical CPUs per actor
    threads: int  # torch threads per actor (0: torch's default)
    store_bytes: float = 0.0  # object store of the smallest node
    backend: str = "torch"  # what encodes (--backend, auto resolved for the actors' device and tower)


def encoder_resources(config: EmbedConfig, tower: str) -> EncoderResources:
    """The encoder actors of `tower` ("img" or "txt": `auto` may pick its backend per tower).
    GPU clusters: one actor per GPU. CPU clusters: one actor per node using all its cores
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
        return EncoderResources(concurrency, num_gpus, 1.0, config.threads, store,
                                choose_backend(config.backend, config.precision, "cuda", tower))
    node_cpus = int(min(n["CPU"] for n in nodes))
    default_per_node = max(1, node_cpus // config.threads) if config.threads else 1
    concurrency = config.concurrency or default_per_node * len(nodes)
    per_node = math.ceil(concurrency / len(nodes))
    threads = config.threads or max(1, node_cpus // per_node)
    share = (node_cpus - STAGE_CPUS) / per_node
    return EncoderResources(concurrency, 0.0, round(min(share, max(STAGE_CPUS, threads - 1)), 3), threads, store,
                            choose_backend(config.backend, config.precision, "cpu", tower))


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
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={
        "source": model.source, "modality": target.modality, "precision": config.precision,
        "threads": resources.threads,
        "compile_batch": batch_size if compiled else 0, "backend": resources.backend},
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
    if target.modality != IMAGES or config.compile == "off" or resources.backend != "torch":
        return False
    if config.compile == "on":
        return True
    per_actor = plan.estimated_rows * len(todo) / max(1, plan.num_shards) / resources.concurrency
    return not resources.num_gpus and per_actor >= COMPILE_MIN_IMAGES


EMBED_GAUGES = {"rows_done": "records encoded by this run", "rows_per_s": "records encoded per second",
                "bad_records": "records skipped", "shards_done": "shards written by this run",
                "shards_todo": "shards this run embeds"}


class Progress:
    """Log lines with counts and throughput: one per finished shard, and one every
    PROGRESS_SECONDS while a shard is still filling."""

    def __init__(self, name: str, num_todo: int):
        self.name, self.num_todo = name, num_todo
        self.start = self.last = time.perf_counter()
        self.num_encoded = self.num_skipped = self.num_shards = 0
        self.nodes: set[str] = set()  # nodes whose encoders delivered rows
        self.gauges = Gauges("clip_embed", EMBED_GAUGES, modality=name)

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
        self.gauges.set(rows_done=self.num_encoded, rows_per_s=self.rate, bad_records=self.num_skipped,
                        shards_done=self.num_shards, shards_todo=self.num_todo)
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

