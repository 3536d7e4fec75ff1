"""Export the text and/or vision tower to ONNX with the flags of cn_clip's pytorch_to_onnx.py:
PREFIX.{img,txt}.{fp32,fp16}.onnx with cn_clip's input and output names, a dynamic batch and
a dynamic text length (up to the context length), each graph checked against PyTorch first.

    python jobs/export_onnx.py --pytorch-ckpt-path pretrained_weights/clip_cn_vit-b-16.pt \
        --save-onnx-path deploy/vit-b-16 --convert-text --convert-vision [--context-length 52]
    python jobs/export_onnx.py --model-arch RN50 --download-root weights --save-onnx-path deploy/rn50 --convert-vision
    python jobs/export_onnx.py --model-arch ViT-B-16 --save-onnx-path deploy/vit-b-16 --convert-vision --int8

--int8 also writes PREFIX.{img,txt}.int8.onnx: texts quantized dynamically, images statically
(activation ranges calibrated on made-up photographs), for CPUs with VNNI or AMX; the graphs
--precision int8 runs (clip_platform.deploy.onnx_export.quantize_graph).

--pytorch-ckpt-path takes anything clip_models.load accepts (cn_clip .pt, Hugging Face
directory, this project's checkpoint) or a released name; --model-arch is then optional
(inferred from the weights, and checked when given). No Ray: it runs in one process.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from clip_platform import cli, config
from clip_platform.deploy.onnx_export import ExportConfig, export_onnx


def main(argv: Sequence[str] | None = None) -> None:
    args = config.parser(ExportConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    for graph in export_onnx(config.from_args(ExportConfig, args)):
        print(json.dumps(asdict(graph), ensure_ascii=False))


if __name__ == "__main__":
    cli.run(main)
