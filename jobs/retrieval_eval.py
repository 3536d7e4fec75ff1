"""Retrieval evaluation of a dataset split in one command: embed images and texts,
top-10 retrieval both ways (text->image and image->text), cn_clip's recall, and a
summary table of R@1/5/10 and mean recall (also written as <output-dir>/summary.json).

    ray job submit --working-dir . -- python jobs/retrieval_eval.py \
        --data-dir datasets/MUGE --split valid \
        --resume experiments/muge_finetune/checkpoints/epoch_latest.pt --output-dir eval/muge_valid

The split's images are read from <data-dir>/lmdb/<split>/imgs when built, else
<data-dir>/<split>_imgs.tsv; texts and ground truth from <data-dir>/<split>_texts.jsonl.
A re-run resumes the feature shards of an interrupted one.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.batch.retrieval import RetrievalEvalConfig, format_table, retrieval_eval


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(RetrievalEvalConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    eval_config = config.from_args(RetrievalEvalConfig, args)
    config.check_model(eval_config.resume or eval_config.vision_model, eval_config.context_length)
    summary = retrieval_eval(eval_config)
    print(format_table(summary))
    print(json.dumps({k: summary[k] for k in ("t2i", "i2t", "mean_recall")}))


if __name__ == "__main__":
    cli.run(main)
