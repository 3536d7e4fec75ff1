"""Build cn_clip LMDB splits from {split}_imgs.tsv + {split}_texts.jsonl, with the
flags and output of cn_clip's preprocess/build_lmdb_dataset.py; images are
validated, and bad records skipped and reported instead of written.

    ray job submit --working-dir . -- python jobs/build_lmdb.py \
        --data_dir datasets/MUGE --splits train,valid,test [--lmdb_dir datasets/MUGE/lmdb]

Locally: `python jobs/build_lmdb.py --data_dir D --splits train,valid`. Inputs of
256 MiB or more are validated by Ray tasks (`--parallel ray|local|auto`).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.data import BuildLmdbConfig, build_lmdb


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", "--data-dir", required=True,
                        help="the directory holding the image TSV files and the text JSONL annotations")
    parser.add_argument("--splits", required=True, help="dataset splits to process, comma separated (train,valid,test)")
    parser.add_argument("--lmdb_dir", "--lmdb-dir", default=None,
                        help="output directory of the LMDB files (default: {data_dir}/lmdb)")
    parser.add_argument("--parallel", choices=("auto", "ray", "local"), default="auto",
                        help="validate images with Ray tasks, in this process, or Ray for large inputs (default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    reports = build_lmdb(config.build(BuildLmdbConfig, vars(args)))
    for report in reports:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    print("done!")


if __name__ == "__main__":
    cli.run(main)
