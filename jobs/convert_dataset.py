"""Convert a clip-pytorch dataset (image folder + JSON list of {"image", "caption": [...]})
to cn_clip's layout: {split}_imgs.tsv + {split}_texts.jsonl, and LMDB with --lmdb.

    python jobs/convert_dataset.py --train datasets/cn_train.json --valid datasets/cn_val.json \\
        --output-dir datasets/flickr8k_cn [--image-root datasets] [--lmdb]
    ray job submit --working-dir . -- python jobs/convert_dataset.py --train ... --output-dir ...
"""
from __future__ import annotations

import json

from clip_platform import cli, config
from clip_platform.data.captions import ConvertConfig, convert_captions

SPLITS = ("train", "valid", "test")


def main(argv=None) -> None:
    parser = config.parser(ConvertConfig, __doc__)
    for split in SPLITS:
        parser.add_argument(f"--{split}", help=f"caption JSON of the {split} split")
    args = parser.parse_args(argv)
    splits = {split: getattr(args, split) for split in SPLITS if hasattr(args, split)}
    report = convert_captions(config.from_args(ConvertConfig, args, {"splits": splits}))
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    cli.run(main)
