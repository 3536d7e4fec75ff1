"""Write the synthetic Chinese image-text dataset (procedural scenes captioned
like "左上角有一个红色的圆形") in cn_clip's layout: {split}_imgs.tsv and
{split}_texts.jsonl for train/valid/test, optionally lmdb/{split}, and a
zero-shot folder dataset zeroshot/{label_cn.txt,test/<label id>/*.jpg}.

    ray job submit --working-dir . -- python jobs/make_synthetic.py \
        --output-dir datasets/synthetic --num-train 2000 --num-valid 200 --num-test 200 --resolution 64 --lmdb
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.data import SyntheticConfig, make_synthetic


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(SyntheticConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    summary = make_synthetic(config.from_args(SyntheticConfig, args))
    print(json.dumps(summary, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    cli.run(main)
