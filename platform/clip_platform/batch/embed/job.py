"""The embed job: plan (or resume) each modality's shards, run the pipeline on those left,
then merge, report and clean up."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

from ...encode.encoder import IMAGE, TEXT
from ...io import remove, write_json
from ...model_info import ModelInfo, inspect_model, same_model
from ...ray_context import ensure_ray
from .config import EmbedConfig, EmbedReport, Target, targets
from .pipeline import EncoderResources, compile_images, encoder_resources, run_shards
from .source import IMAGES, TEXTS, CorpusPlan, plan_corpus
from .store import ShardStore

log = logging.getLogger(__name__)


def run_settings(target: Target, config: EmbedConfig, model: ModelInfo, backend: str = "torch") -> dict[str, Any]:
    """What the features depend on besides the input: a resumed run must match it."""
    settings = {"model": model.fingerprint, "precision": config.precision, "format": target.format}
    if backend != "torch":  # runs of the torch backend planned before there were others match it
        settings["backend"] = backend
    if target.modality == TEXTS:
        settings["context_length"] = config.context_length
    return settings


def prepare_plan(store: ShardStore, target: Target, config: EmbedConfig, model: ModelInfo,
                 backend: str = "torch") -> CorpusPlan:
    """The shards of this input: those of the folder's plan when it is the same run
    (resume), else a new plan; shards of another input or model stop the job
    unless --overwrite."""
    settings = _json_roundtrip(run_settings(target, config, model, backend))
    saved = store.load_plan()
    if saved is not None:
        plan = plan_corpus(target.data, target.modality, config.rows_per_shard, saved.get("requested"))
        differs = [name for name, same in (("input", saved.get("input") == _json_roundtrip(plan.fingerprint)),
                                           ("settings", same_settings(saved.get("settings"), settings)))
                   if not same]
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


def same_settings(saved: dict | None, now: dict) -> bool:
    """The same settings, the model compared by its fingerprint's rule (model_info.same_model)."""
    if not isinstance(saved, dict) or not same_model(saved.get("model"), now.get("model")):
        return False
    return {k: v for k, v in saved.items() if k != "model"} == {k: v for k, v in now.items() if k != "model"}


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def embed_target(target: Target, config: EmbedConfig, model: ModelInfo, resources: EncoderResources) -> EmbedReport:
    start = time.perf_counter()
    store = ShardStore(target.shards_dir, target.modality, target.format)
    plan = prepare_plan(store, target, config, model, resources.backend)
    done = store.finished(plan.num_shards)
    todo = [i for i in range(plan.num_shards) if i not in done]
    compiled = compile_images(config, resources, plan, todo, target)
    log.info("%s: %s -> %s: %d shards, %d finished earlier, %d to embed with %d %s encoder actor(s) "
             "(%s GPU, %s CPU, %s threads each%s)", target.modality.name, target.data, store.directory,
             plan.num_shards, len(done), len(todo), resources.concurrency, resources.backend, resources.num_gpus,
             resources.num_cpus,
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
        write_json(store.path("_summary.json"), asdict(report))
    else:
        remove(store.directory)
    log.info("%s: %d features (%d encoded now, %.1f/s, on %d node(s)); %s", target.modality.name, num_features,
             num_encoded, report.per_second, report.num_nodes, skipped)
    return report


def embed(config: EmbedConfig) -> list[EmbedReport]:
    """Embed the requested corpora; one report per modality (texts first, as cn_clip)."""
    model = inspect_model(config.model_source)
    ensure_ray()
    log.info("model %s from %s, precision %s, backend %s", model.name, model.source, config.precision,
             config.backend)
    return [embed_target(target, config, model,
                         encoder_resources(config, IMAGE if target.modality == IMAGES else TEXT))
            for target in targets(config)]
