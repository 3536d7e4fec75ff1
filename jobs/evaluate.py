"""Recall@1/5/10 and mean recall of retrieval predictions: cn_clip's
evaluation.py (text->image) and, with `--mode i2t`, evaluation_tr.py
(image->text), with the same rules, numbers and output JSON.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        test_texts.jsonl test_predictions.jsonl output.json [--mode i2t]

For --mode i2t the ground truth is the transformed annotation file
(jobs/transform_annotations.py); the text->image file itself is also accepted.
A malformed file writes cn_clip's error JSON to OUT and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.batch.evaluate import EvaluateConfig, evaluate
from clip_platform.batch.predictions import MODES


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ground_truth", help="annotations JSONL (GT)")
    parser.add_argument("predictions", help="predictions JSONL (PRED)")
    parser.add_argument("output", help="recall JSON to write (OUT)")
    parser.add_argument("--mode", choices=MODES, default="t2i", help="t2i: text->image (default); i2t: image->text")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    result = evaluate(config.build(EvaluateConfig, vars(parse_args(argv))))
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
