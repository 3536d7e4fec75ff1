"""Convert a clip-pytorch dataset (image folder + JSON list of {"image", "caption": [...]})
to cn_clip's layout: {split}_imgs.tsv + {split}_texts.jsonl, and LMDB with --lmdb.

    python jobs/convert_dataset.py --train datasets/cn_train.json --valid datasets/cn_val.json \\
        --output-dir datasets/flickr8k_cn [--image-root datasets] [--lmdb]
    ray job submit --working-dir . -- python jobs/convert_dataset.py --train ... --output-dir ...
"""
from __future__ import annotations

import argparse
import json

from clip_platform import cli
from clip_platform.data.captions import ConvertConfig, convert_captions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for split in ("train", "valid", "test"):
        parser.add_argument(f"--{split}", help=f"caption JSON of the {split} split")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="cn_clip dataset directory to write")
    parser.add_argument("--image-root", "--image_root", help="folder the JSON's image paths are relative to")
    parser.add_argument("--lmdb", action="store_true", help="also build lmdb/{split}")
    args = parser.parse_args(argv)
    splits = {s: getattr(args, s) for s in ("train", "valid", "test") if getattr(args, s)}
    report = convert_captions(ConvertConfig(args.output_dir, splits, args.image_root, args.lmdb))
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    cli.run(main)
