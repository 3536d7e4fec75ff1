"""Build TensorRT engines from the ONNX graphs of jobs/export_onnx.py, with the flags of
cn_clip's onnx_to_tensorrt.py: --batch-size is the largest batch of the engines' optimisation
profile, which covers batch 1..--batch-size and text length 1..--context-length.

    python jobs/export_tensorrt.py --convert-text --text-onnx-path deploy/vit-b-16.txt.fp32.onnx \
        --convert-vision --vision-onnx-path deploy/vit-b-16.img.fp32.onnx \
        --save-tensorrt-path deploy/vit-b-16 --batch-size 256 --fp16

Writes PREFIX.{img,txt}.{fp16,fp32}.trt. Needs a CUDA GPU and the tensorrt package; without
them it stops in one line.
"""
from __future__ import annotations

from collections.abc import Sequence

from clip_platform import cli, config
from clip_platform.deploy.tensorrt_build import TensorRTConfig, export_tensorrt


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(TensorRTConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    for path in export_tensorrt(config.from_args(TensorRTConfig, args)):
        print(path)


if __name__ == "__main__":
    cli.run(main)
