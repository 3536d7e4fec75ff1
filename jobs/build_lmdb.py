"""Build cn_clip LMDB splits from {split}_imgs.tsv + {split}_texts.jsonl, with the
flags and output of cn_clip's preprocess/build_lmdb_dataset.py; images are
validated, and bad records skipped and reported instead of written.

    ray job submit --working-dir . -- python jobs/build_lmdb.py \
        --data_dir datasets/MUGE --splits train,valid,test [--lmdb_dir datasets/MUGE/lmdb]

Locally: `python jobs/build_lmdb.py --data_dir D --splits train,valid`. Inputs of
256 MiB or more are validated by Ray tasks (`--parallel ray|local|auto`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.data import BuildLmdbConfig, build_lmdb


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(BuildLmdbConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    reports = build_lmdb(config.from_args(BuildLmdbConfig, args))
    for report in reports:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    print("done!")


if __name__ == "__main__":
    cli.run(main)
