"""Retrieval evaluation of one dataset split in one call: embed images and texts ->
top-10 both ways (text->image, image->text) -> cn_clip's recall -> a summary.

    out/features/{images,texts}/   Parquet feature shards (a re-run resumes them)
    out/ground_truth_{t2i,i2t}.jsonl  the split's annotations, limited to queries with features
    out/{t2i,i2t}_predictions.jsonl   cn_clip's prediction files
    out/{t2i,i2t}_recall.json         cn_clip's recall JSON
    out/summary.json                  R@1/5/10 and mean recall both ways, counts, skipped records

Records the embed job skipped (unreadable images, malformed lines) cannot be
queries; they are left out of the ground truth and reported. As targets they
still count: a text whose only image was skipped is a miss.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import clip_models

from .. import config as config_io
from ..data import iter_texts, lmdb_io
from ..io import write_json, write_lines
from .embed import EmbedConfig, EmbedReport, embed
from .evaluate import TOP_K, EvaluateConfig, evaluate
from ..data.features import read_features
from .knn import KnnConfig, knn_search
from ..encode.precision import PRECISIONS
from .predictions import MODES, transform_t2i_to_i2t

log = logging.getLogger(__name__)

MODE_NAMES = {"t2i": "text→image", "i2t": "image→text"}


@dataclass(frozen=True)
class RetrievalEvalConfig:
    output_dir: str  # folder for everything this evaluation writes: features, predictions, scores
    data_dir: str = ""  # dataset folder: {split}_texts.jsonl plus {split}_imgs.tsv or lmdb/{split}/imgs
    resume: str | None = None  # checkpoint: anything clip_models.load accepts
    vision_model: str | None = None  # a released model name, when --resume is not given
    split: str = "valid"  # dataset split to evaluate
    image_data: str | None = None  # overrides the split's images (LMDB imgs dir, TSV, Parquet, image files)
    text_data: str | None = None  # overrides the split's texts JSONL (also the ground truth)
    precision: Literal[PRECISIONS] = "amp"  # amp/fp32: fp32 as cn_clip; bf16/fp16: autocast
    img_batch_size: int = 64  # images per encoder batch
    text_batch_size: int = 64  # texts per encoder batch
    context_length: int = 52  # token limit per text, [CLS] and [SEP] included
    num_gpus: float | None = None  # GPUs per encoder actor (default: 1 when the cluster has GPUs)
    concurrency: int = 0  # encoder actors (0: automatic)
    rows_per_shard: int = 10000  # records per feature shard

    def __post_init__(self):
        if not self.data_dir and not (self.image_data and self.text_data):
            raise ValueError("give the dataset folder, or both image_data and text_data")
        if not self.output_dir:
            raise ValueError("output_dir is required")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.resume and self.vision_model not in clip_models.available_models():
            raise ValueError(f"--resume is required unless --vision-model names a released model "
                             f"({', '.join(clip_models.available_models())})")
        config_io.check_output(self.output_dir, "--output-dir", directory=True)


def split_inputs(config: RetrievalEvalConfig) -> tuple[str, str]:
    """(images, texts) of the split: LMDB images when built (as cn_clip evaluates), else the TSV."""
    data = Path(config.data_dir or ".")
    texts = config.text_data or str(data / f"{config.split}_texts.jsonl")
    if config.image_data:
        images = config.image_data
    elif lmdb_io.is_env_dir(data / "lmdb" / config.split / "imgs"):
        images = str(data / "lmdb" / config.split / "imgs")
    else:
        images = str(data / f"{config.split}_imgs.tsv")
    for path, what in ((texts, "texts"), (images, "images")):
        if "://" not in path and not Path(path).exists():
            raise FileNotFoundError(f"no {what} for split {config.split!r}: {path} does not exist")
    return images, texts


def embed_split(config: RetrievalEvalConfig, images: str, texts: str) -> dict[str, EmbedReport]:
    embed_config = EmbedConfig(
        extract_image_feats=True, extract_text_feats=True, image_data=images, text_data=texts,
        resume=config.resume, vision_model=config.vision_model, precision=config.precision,
        img_batch_size=config.img_batch_size, text_batch_size=config.text_batch_size,
        context_length=config.context_length, output_dir=str(Path(config.output_dir) / "features"),
        format="parquet", num_gpus=config.num_gpus, concurrency=config.concurrency,
        rows_per_shard=config.rows_per_shard,
        overwrite=True)  # a new checkpoint at the same path (re-finetuned) must not reuse old features
    return {report.modality: report for report in embed(embed_config)}


def write_ground_truth(texts: str, out: Path, image_ids: set[int], text_ids: set[int]) -> dict[str, Any]:
    """Both ground-truth files, limited to queries that have features; counts of what was left out."""
    records = [r for r in iter_texts(texts) if r.image_ids]
    t2i = {r.text_id: list(r.image_ids) for r in records}
    i2t = transform_t2i_to_i2t(t2i.items())
    kept = {"t2i": {q: ids for q, ids in t2i.items() if q in text_ids},
            "i2t": {q: ids for q, ids in i2t.items() if q in image_ids}}
    for mode, reference in kept.items():
        query_key, result_key = ("text_id", "image_ids") if mode == "t2i" else ("image_id", "text_ids")
        write_lines(out / f"ground_truth_{mode}.jsonl",
                    (json.dumps({query_key: q, result_key: ids}) + "\n" for q, ids in reference.items()))
    return {"t2i": {"num_queries": len(kept["t2i"]), "num_without_features": len(t2i) - len(kept["t2i"])},
            "i2t": {"num_queries": len(kept["i2t"]), "num_without_features": len(i2t) - len(kept["i2t"])}}


def search_and_score(config: RetrievalEvalConfig, mode: str) -> dict[str, float]:
    out = Path(config.output_dir)
    features = out / "features"
    knn_search(KnnConfig(image_feats=str(features / "images"), text_feats=str(features / "texts"),
                         output=str(out / f"{mode}_predictions.jsonl"), top_k=TOP_K, mode=mode))
    result = evaluate(EvaluateConfig(ground_truth=str(out / f"ground_truth_{mode}.jsonl"),
                                     predictions=str(out / f"{mode}_predictions.jsonl"),
                                     output=str(out / f"{mode}_recall.json"), mode=mode))
    scores = result["scoreJson"]
    return {key: scores[key] for key in ("r1", "r5", "r10", "mean_recall")}


def retrieval_eval(config: RetrievalEvalConfig) -> dict[str, Any]:
    """Embed, retrieve both ways, score; writes and returns the summary."""
    start = time.perf_counter()
    out = Path(config.output_dir)
    images, texts = split_inputs(config)
    reports = embed_split(config, images, texts)
    image_ids = set(read_features(out / "features" / "images").ids.tolist())
    text_ids = set(read_features(out / "features" / "texts").ids.tolist())
    if len(image_ids) < TOP_K or len(text_ids) < TOP_K:
        raise ValueError(f"recall@{TOP_K} needs at least {TOP_K} images and texts with features; "
                         f"this split has {len(image_ids)} images and {len(text_ids)} texts")
    queries = write_ground_truth(texts, out, image_ids, text_ids)
    scores = {mode: search_and_score(config, mode) for mode in MODES}
    summary = {
        "split": config.split, "model": config.resume or config.vision_model, "images": images, "texts": texts,
        **scores,
        "mean_recall": (scores["t2i"]["mean_recall"] + scores["i2t"]["mean_recall"]) / 2,
        "queries": queries,
        "num_images": len(image_ids), "num_texts": len(text_ids),
        "skipped": {name: report.skipped for name, report in reports.items()},
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "summary.json", summary)
    log.info("retrieval evaluation of %s written to %s", config.split, out / "summary.json")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a small fixed-width table (percentages)."""
    rows = [f"{'':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for mode in MODES:
        s = summary[mode]
        rows.append(f"{MODE_NAMES[mode]:<12}{s['r1']:>8.2f}{s['r5']:>8.2f}{s['r10']:>8.2f}{s['mean_recall']:>8.2f}")
    rows.append(f"{'mean':<12}{'':>24}{summary['mean_recall']:>8.2f}")
    skipped = sum(s["num_bad"] for s in summary["skipped"].values())
    rows.append(f"{summary['split']}: {summary['num_images']} images, {summary['num_texts']} texts"
                + (f", {skipped} records skipped" if skipped else ""))
    return "\n".join(rows)
