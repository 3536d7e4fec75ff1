"""Recall@1/5/10 of retrieval predictions: cn_clip's evaluation.py (text->image) and
evaluation_tr.py (image->text), with the same rules, numbers and output JSON.

Rules kept from cn_clip: every query needs exactly 10 distinct predicted ids; a
query is a hit at K when any of its ground-truth ids is in the first K; recalls
are percentages and the score is their mean. Runs on the driver: the inputs are
one line per query, small next to the features they came from.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import config as config_io
from ..index.recall import compute_recall
from ..io import write_json, write_lines
from .predictions import (MODES, check_mode, iter_annotations, looks_like, read_annotations, read_predictions,
                          transform_t2i_to_i2t)

log = logging.getLogger(__name__)

TOP_K = 10  # cn_clip requires exactly ten predictions per query


@dataclass(frozen=True)
class EvaluateConfig:
    ground_truth: str  # annotations JSONL (t2i: *_texts.jsonl; i2t: its *.tr.jsonl, or the t2i file itself)
    predictions: str  # predictions JSONL from jobs/knn.py or cn_clip's make_topk_predictions*.py
    output: str  # recall JSON path
    mode: Literal[MODES] = "t2i"  # t2i: text->image; i2t: image->text

    def __post_init__(self):
        check_mode(self.mode)
        for name in ("ground_truth", "predictions", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} path is required")
        config_io.check_output(self.output, "OUT", uri=None)  # written through clip_platform.io


def error_json(message: str) -> dict:
    """cn_clip's report_error_msg dict, written when evaluation fails."""
    return {"errorDetail": message, "errorMsg": message, "score": 0, "scoreJson": {}, "success": False}


def load_reference(path: str | os.PathLike, mode: str) -> dict[int, list[int]]:
    """Ground truth for `mode`; for i2t, text->image annotations are transformed in memory."""
    if mode == "i2t" and not looks_like(path, "i2t") and looks_like(path, "t2i"):
        log.info("%s holds text->image annotations: transforming them to image->text", path)
        reference = transform_t2i_to_i2t(iter_annotations(path, "t2i"))
        if not reference:
            raise ValueError(f"ground-truth file {path} holds no annotations")
        return reference
    return read_annotations(path, mode)


def evaluate(config: EvaluateConfig) -> dict:
    """Score `config.predictions` against `config.ground_truth`; writes and returns
    cn_clip's recall JSON. A bad input writes cn_clip's error JSON, then raises."""
    # ensure_ascii=True: json.dump's defaults, as cn_clip's dump_2_json, so the bytes are identical.
    try:
        reference = load_reference(config.ground_truth, config.mode)
        predictions = read_predictions(config.predictions, config.mode, reference, TOP_K)
        result = compute_recall(reference, predictions).to_json()
    except (ValueError, FileNotFoundError) as exc:
        write_json(config.output, error_json(str(exc)), ensure_ascii=True)
        raise
    write_json(config.output, result, ensure_ascii=True)
    scores = result["scoreJson"]
    log.info("%s recall over %d queries: R@1 %.2f  R@5 %.2f  R@10 %.2f  mean %.2f -> %s", config.mode,
             len(reference), scores["r1"], scores["r5"], scores["r10"], scores["mean_recall"], config.output)
    return result


# ---------------------------------------------------------------- annotation transform

def default_tr_path(input_path: str) -> str:
    # cn_clip's rule, kept verbatim so its downstream commands find the file.
    return input_path.replace(".jsonl", "") + ".tr.jsonl"


def transform_annotations(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None) -> Path:
    """cn_clip's transform_ir_annotation_to_tr.py: text->image annotations to
    image->text (`{"image_id", "text_ids"}` lines), default output `X.tr.jsonl`."""
    output = Path(output_path or default_tr_path(str(input_path)))
    i2t = transform_t2i_to_i2t(iter_annotations(input_path, "t2i"))
    write_lines(output, _tr_lines(i2t))
    log.info("wrote %d image->text annotations to %s", len(i2t), output)
    return output


def _tr_lines(i2t: dict[int, list[int]]) -> Iterator[str]:
    for image_id, text_ids in i2t.items():
        yield json.dumps({"image_id": image_id, "text_ids": text_ids}) + "\n"
