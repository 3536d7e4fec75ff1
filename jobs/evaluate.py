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

import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.batch.evaluate import EvaluateConfig, evaluate


def main(argv: Sequence[str] | None = None) -> None:
    parser = config.parser(EvaluateConfig, __doc__.split("\n\n")[0],
                           positional=("ground_truth", "predictions", "output"))
    result = evaluate(config.from_args(EvaluateConfig, parser.parse_args(argv)))
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
