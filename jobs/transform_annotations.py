"""Turn text->image annotations (`{"text_id", "text", "image_ids"}` lines) into
image->text ground truth (`{"image_id", "text_ids"}`), as cn_clip's
transform_ir_annotation_to_tr.py does, for `jobs/evaluate.py --mode i2t`.

    ray job submit --working-dir . -- python jobs/transform_annotations.py \
        --input datasets/Flickr30k-CN/test_texts.jsonl   # writes test_texts.tr.jsonl
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from clip_platform import cli
from clip_platform.batch.evaluate import transform_annotations


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="text->image annotation JSONL")
    parser.add_argument("--output", default=None, help="output path (default: INPUT with .jsonl -> .tr.jsonl)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(transform_annotations(args.input, args.output))


if __name__ == "__main__":
    cli.run(main)
