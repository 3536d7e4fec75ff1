"""TensorRT engines from the exported ONNX graphs: cn_clip's onnx_to_tensorrt.py, with one
optimisation profile covering batch 1..--batch-size (and text length 1..--context-length)
instead of cn_clip's single fixed shape.

Engines are built on the GPU that will run them, with the `tensorrt` Python package; it is
imported only here, when a build or a run asks for it: without CUDA or without the package
the job stops in one line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import config as config_io
from ..cli import UserError
from .onnx_export import INPUTS

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 8 << 30  # builder scratch memory (cn_clip: ~10 GB)


@dataclass(frozen=True)
class TensorRTConfig:
    save_tensorrt_path: str  # output prefix: PREFIX.{img,txt}.{fp32,fp16}.trt
    convert_text: bool = False  # build the text engine from --text-onnx-path
    text_onnx_path: str | None = None  # the text graph, e.g. PREFIX.txt.fp32.onnx from jobs/export_onnx.py
    convert_vision: bool = False  # build the vision engine from --vision-onnx-path
    vision_onnx_path: str | None = None  # the vision graph, e.g. PREFIX.img.fp32.onnx
    model_arch: str | None = None  # accepted for cn_clip's command lines; the image size is read from the graph
    batch_size: int = 1  # the largest batch of the engines' profile (it covers 1..batch_size)
    context_length: int = 52  # the longest text of the text engine's profile (it covers 1..context_length)
    fp16: bool = False  # build fp16 engines (PREFIX.*.fp16.trt)
    fp32: bool = False  # build fp32 engines (PREFIX.*.fp32.trt)
    fp16_banned_ops: str = ""  # comma-separated TensorRT layer types kept in fp32 in fp16 engines (e.g. NORMALIZATION)

    def __post_init__(self):
        if not (self.convert_text or self.convert_vision):
            raise ValueError("nothing to do: give --convert-text and/or --convert-vision")
        if not (self.fp16 or self.fp32):
            raise ValueError("give --fp16 and/or --fp32")
        if self.batch_size < 1 or self.context_length < 2:
            raise ValueError("batch_size must be at least 1 and context_length at least 2")
        for wanted, flag, path in ((self.convert_text, "--text-onnx-path", self.text_onnx_path),
                                   (self.convert_vision, "--vision-onnx-path", self.vision_onnx_path)):
            if wanted and not path:
                raise ValueError(f"give {flag}")
            if wanted and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path} does not exist")
        for tower in ("img", "txt"):
            for precision in ("fp16", "fp32"):
                config_io.check_output(str(engine_path(self.save_tensorrt_path, tower, precision)),
                                       "--save-tensorrt-path")


def engine_path(prefix: str, tower: str, precision: str) -> Path:
    return Path(f"{prefix}.{tower}.{precision}.trt")


def import_tensorrt():
    """The tensorrt module on a machine with CUDA, else UserError (the job's one line)."""
    if not torch.cuda.is_available():
        raise UserError("TensorRT engines are built and run on a CUDA GPU, and torch sees none on this machine")
    try:
        import tensorrt
    except ImportError:
        raise UserError("the tensorrt package is not installed (pip install tensorrt on the GPU machine)") from None
    return tensorrt


def profile_shapes(onnx_path: str | Path, tower: str, max_batch: int, context_length: int):
    """(min, opt, max) input shapes: batch 1..max_batch, text length 1..context_length, images at
    the graph's own size."""
    import onnx

    if tower == "txt":
        return (1, 1), (max_batch, context_length), (max_batch, context_length)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    return (1, *dims), (max_batch, *dims), (max_batch, *dims)


def build_engine(onnx_path: str | Path, tower: str, fp16: bool, max_batch: int, context_length: int = 52,
                 banned_ops: tuple[str, ...] = ()) -> bytes:
    """A serialized TensorRT engine of the graph, its profile over the dynamic batch (and length)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        if banned_ops:  # cn_clip's --fp16-banned-ops: these layers compute in fp32
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.type.name in banned_ops:
                    layer.precision = trt.float32
                    layer.set_output_type(0, trt.float32)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUTS[tower], *profile_shapes(onnx_path, tower, max_batch, context_length))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(serialized)


def export_tensorrt(config: TensorRTConfig) -> list[str]:
    """cn_clip's onnx_to_tensorrt.py: the asked towers in the asked precisions; the engines' paths."""
    import_tensorrt()
    banned = tuple(op.strip().upper() for op in config.fp16_banned_ops.split(",") if op.strip())
    out = []
    for tower, wanted, onnx_path in (("txt", config.convert_text, config.text_onnx_path),
                                     ("img", config.convert_vision, config.vision_onnx_path)):
        if not wanted:
            continue
        for precision in [p for p, on in (("fp32", config.fp32), ("fp16", config.fp16)) if on]:
            engine = build_engine(onnx_path, tower, precision == "fp16", config.batch_size, config.context_length,
                                  banned)
            path = engine_path(config.save_tensorrt_path, tower, precision)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(engine)
            log.info("%s: %s engine, batch 1..%d%s", path, precision, config.batch_size,
                     f", length 1..{config.context_length}" if tower == "txt" else "")
            out.append(str(path))
    return out


class TensorRTEngine:
    """A built engine run on the current CUDA device: torch tensors in, float32 features out."""

    def __init__(self, path: str | Path):
        trt = import_tensorrt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if n != self.input)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.cuda().contiguous()
        self.context.set_input_shape(self.input, tuple(inputs.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input, inputs.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out
