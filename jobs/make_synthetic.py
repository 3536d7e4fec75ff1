"""Write the synthetic Chinese image-text dataset (procedural scenes captioned
like "左上角有一个红色的圆形") in cn_clip's layout: {split}_imgs.tsv and
{split}_texts.jsonl for train/valid/test, optionally lmdb/{split}, and a
zero-shot folder dataset zeroshot/{label_cn.txt,test/<label id>/*.jpg}.

    ray job submit --working-dir . -- python jobs/make_synthetic.py \
        --output-dir datasets/synthetic --num-train 2000 --num-valid 200 --num-test 200 --resolution 64 --lmdb
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.data import SyntheticConfig, make_synthetic


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SyntheticConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                        help="dataset directory to write (created if missing)")
    for name in ("num_train", "num_valid", "num_test", "resolution", "seed", "max_count", "train_texts_per_scene",
                 "zeroshot_per_class"):
        flag = name.replace("_", "-")
        parser.add_argument(f"--{flag}", f"--{name}", dest=name, type=int, default=defaults[name].default,
                            help=f"default {defaults[name].default}")
    parser.add_argument("--lmdb", action="store_true", help="also build lmdb/{split} as jobs/build_lmdb.py does")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    summary = make_synthetic(config.build(SyntheticConfig, vars(parse_args(argv))))
    print(json.dumps(summary, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    cli.run(main)
