"""The towers as ONNX graphs: cn_clip's pytorch_to_onnx.py with a dynamic batch and text length.

Each tower becomes two graphs, `PREFIX.{img,txt}.fp32.onnx` and `PREFIX.{img,txt}.fp16.onnx`,
with cn_clip's names (`image` -> `unnorm_image_features`, `text` -> `unnorm_text_features`), so
code written for cn_clip's graphs runs them unchanged. Unlike cn_clip's, the batch dimension is
dynamic, and so is the text length (1 up to the context length): the text tower masks padding
(id 0) itself, so a batch padded to its longest text gives the features of one padded to 52.
The fp16 graphs keep float32 inputs and outputs (cn_clip's keep_io_types) and are exported from
a half-precision copy of the model whose fp32 LayerNorms stay fp32, as cn_clip's convert_weights.

The backends' caches also hold int8 graphs (--precision int8, for CPUs with VNNI or AMX):
`quantize_graph` makes them from the fp32 ones with ONNX Runtime's quantization tools.

Every graph is run by ONNX Runtime against the PyTorch model before it is kept: fp32 within
1e-4 relative (per feature vector), fp16 within cosine 0.999, int8 within cosine 0.99.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import clip_models
from clip_models.vit import LayerNorm as FP32LayerNorm

from .. import config as config_io
from ..model_info import ModelInfo

log = logging.getLogger(__name__)

TOWERS = ("img", "txt")  # cn_clip's file infixes
GRAPH_PRECISIONS = ("fp32", "fp16")  # what jobs/export_onnx.py writes
INT8 = "int8"  # the quantized graphs of the backends' cache (quantize_graph)
INPUTS = {"img": "image", "txt": "text"}
OUTPUTS = {"img": "unnorm_image_features", "txt": "unnorm_text_features"}
OPSET = 17  # LayerNormalization as one op; TensorRT 8.6+ and OpenVINO read it
MAX_BATCH = 1 << 16  # the dynamo exporter's bound on the batch (a symbol in the graph: no cost)
FP32_RELATIVE_ERROR = 1e-4  # ||onnx - torch|| / ||torch|| per feature vector
FP16_COSINE = 0.999
INT8_COSINE = 0.99  # per feature vector, against fp32 PyTorch, on inputs the calibration did not see
CALIBRATION_IMAGES = 32  # the image graph's activation ranges are calibrated on this many images
# Graphs of more than this many bytes of weights keep them in a file beside the graph
# (protobuf's 2 GiB limit; ViT-H-14's fp32 image tower is 2.5 GB).
EXTERNAL_DATA_BYTES = 1 << 30
CACHE_ENV = "CLIP_GRAPH_CACHE"  # where exported graphs are cached (default ~/.cache/clip_platform/graphs)


@dataclass(frozen=True)
class ExportConfig:
    save_onnx_path: str  # output prefix: PREFIX.img.fp32.onnx, PREFIX.img.fp16.onnx, PREFIX.txt.*.onnx
    pytorch_ckpt_path: str | None = None  # anything clip_models.load accepts, or a released name
    model_arch: str | None = None  # released architecture (RN50, ViT-B-16, ...): downloaded without a checkpoint, else checked
    download_root: str | None = None  # where a released checkpoint is downloaded to (default: clip_models' cache)
    convert_text: bool = False  # export the text tower
    convert_vision: bool = False  # export the vision tower
    context_length: int = 52  # longest text the text graph is checked at ([CLS] and [SEP] included)
    int8: bool = False  # also PREFIX.{img,txt}.int8.onnx (for CPUs with VNNI or AMX), checked to cosine 0.99

    def __post_init__(self):
        if not (self.convert_text or self.convert_vision):
            raise ValueError("nothing to do: give --convert-text and/or --convert-vision")
        released = clip_models.available_models()
        if self.model_arch is not None and self.model_arch not in released:
            raise ValueError(f"--model-arch {self.model_arch} is not one of {', '.join(released)}")
        if not self.pytorch_ckpt_path and not self.model_arch:
            raise ValueError("give --pytorch-ckpt-path (a checkpoint or a released name) or --model-arch")
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2 ([CLS] and [SEP]), got {self.context_length}")
        for tower in TOWERS:
            for precision in (*GRAPH_PRECISIONS, INT8):
                config_io.check_output(str(graph_path(self.save_onnx_path, tower, precision)), "--save-onnx-path")

    @property
    def source(self) -> str:
        return self.pytorch_ckpt_path or self.model_arch


@dataclass(frozen=True)
class ExportedGraph:
    path: str
    tower: str  # img or txt
    precision: str  # fp32 or fp16
    check: str  # what was compared with PyTorch, and the result


def graph_path(prefix: str | os.PathLike, tower: str, precision: str) -> Path:
    return Path(f"{prefix}.{tower}.{precision}.onnx")


# ---------------------------------------------------------------- the graphs

class ImageTower(nn.Module):
    """cn_clip's vision graph: float32 preprocessed images [N, 3, S, S] -> float32 features."""

    def __init__(self, model: clip_models.CLIP):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image.to(self.model.dtype)).float()


class TextTower(nn.Module):
    """cn_clip's text graph: int64 token ids [N, L] (0-padded, any L up to the context) -> float32 features."""

    def __init__(self, model: clip_models.CLIP):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text).float()


def half_copy(model: clip_models.CLIP) -> clip_models.CLIP:
    """The model in fp16, but for its LayerNorms, which keep fp32 weights and compute in fp32, as
    cn_clip's convert_weights leaves them (and the exporter needs: an fp16 LayerNorm exports with
    fp32 statistics against fp16 weights, a graph ONNX Runtime refuses)."""
    half = copy.deepcopy(model).half()
    for parent in list(half.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.LayerNorm):
                norm = FP32LayerNorm(child.normalized_shape, eps=child.eps)
                norm.load_state_dict({k: v.float() for k, v in child.state_dict().items()})
                setattr(parent, name, norm)
    return half


def sample_images(model: clip_models.CLIP, batch: int, seed: int = 0) -> np.ndarray:
    size = model.image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def sample_tokens(model: clip_models.CLIP, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[CLS] random wordpieces [SEP], the rows of different lengths (the longest `length`), 0-padded."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length), np.int64)
    for row in range(batch):
        used = max(2, length - 3 * row)
        tokens[row, 0], tokens[row, used - 1] = 101, 102  # [CLS], [SEP]
        tokens[row, 1:used - 1] = rng.integers(106, model.config.text.vocab_size, used - 2)
    return tokens


def export_graph(model: clip_models.CLIP, tower: str, precision: str, path: str | os.PathLike) -> Path:
    """One tower of `model` as an ONNX graph at `path` (fp32, or fp16 with float32 inputs and outputs),
    its batch and (text) length dynamic. Weights over EXTERNAL_DATA_BYTES go to one file beside it."""
    model = (model if precision == "fp32" else half_copy(model)).eval()
    module = (ImageTower(model) if tower == "img" else TextTower(model)).eval()
    if tower == "img":
        example, axes = torch.from_numpy(sample_images(model, 2)), {0: ("batch", MAX_BATCH)}
    else:
        positions = model.config.text.max_position_embeddings
        example = torch.from_numpy(sample_tokens(model, 2, min(8, positions)))
        axes = {0: ("batch", MAX_BATCH), 1: ("length", positions)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        # A graph over 2 GiB is written with a file per weight: made aside, then packed into one.
        target = Path(tmp) / path.name if big else path
        _torch_export(module, example, target, INPUTS[tower], OUTPUTS[tower], axes, big)
        if big:
            import onnx

            onnx.save_model(onnx.load(str(target)), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{path.name}.data")
    return path


def _torch_export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                  axes: dict[int, tuple[str, int]], big: bool) -> None:
    """torch.onnx.export through its TorchScript exporter: 10-20x faster than the dynamo one here
    (a tiny tower: 0.2-0.7 s of CPU against 3-7 s) and opset 17, which TensorRT 8.6+ parses.
    Deprecated in torch 2.x: where it is gone or fails, the dynamo exporter (warned once)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation and tracer warnings, for every export
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {i: name for i, (name, _) in axes.items()}},
                              opset_version=OPSET, dynamo=False)
        return
    except Exception as error:  # noqa: BLE001 - any failure of the old exporter: the new one may succeed
        if not _warned:
            log.warning("torch's TorchScript ONNX exporter failed (%s): exporting with the dynamo exporter", error)
            _warned.append(True)
    from torch.export import Dim

    dims = {i: Dim(name, min=1, max=largest) for i, (name, largest) in axes.items()}
    # The dynamo exporter prints its progress and warns about torchvision's ops: keep both out of the output.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamic_shapes=(dims,), dynamo=True, optimize=True,
                              external_data=big)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


_warned: list[bool] = []


def check_graph(path: str | os.PathLike, model: clip_models.CLIP, tower: str, precision: str,
                batches: tuple[int, ...] = (1, 3), lengths: tuple[int, ...] = (5, 52)) -> str:
    """Run the graph with ONNX Runtime (CPU) and the model with PyTorch (fp32) on the same inputs:
    images at each batch size, texts at each batch size and length (rows padded to different
    lengths). RuntimeError when they differ by more than the precision allows; else what was compared."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if tower == "img":
        inputs = [(calibration_images if precision == INT8 else sample_images)(model, n, seed=1000 + n)
                  for n in batches]
    else:
        positions = model.config.text.max_position_embeddings
        inputs = [sample_tokens(model, n, min(length, positions), seed=n) for n in batches for length in lengths]
    bound = {"fp16": FP16_COSINE, INT8: INT8_COSINE}.get(precision)  # else fp32's relative error
    worst = 1.0 if bound else 0.0
    for array in inputs:
        with torch.no_grad():
            x = torch.from_numpy(array)
            reference = (model.encode_image(x) if tower == "img" else model.encode_text(x)).float().numpy()
        got = session.run(None, {INPUTS[tower]: array})[0]
        if bound:
            cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
            worst = min(worst, float(np.nan_to_num(cosine).min()))
        else:
            error = np.linalg.norm(got - reference, axis=1) / np.linalg.norm(reference, axis=1)
            worst = max(worst, float(np.nan_to_num(error, nan=np.inf).max()))
    shapes = ", ".join("x".join(map(str, a.shape[:2] if tower == "txt" else a.shape[:1])) for a in inputs)
    if bound:
        verdict, ok = f"min cosine {worst:.6f} (needs >= {bound})", worst >= bound
    else:
        verdict, ok = f"max relative error {worst:.2e} (needs <= {FP32_RELATIVE_ERROR:g})", worst <= FP32_RELATIVE_ERROR
    if not ok:
        raise RuntimeError(f"{path} differs from the PyTorch model: {verdict} at {tower} inputs {shapes}")
    return f"{verdict} at inputs {shapes}"


# ---------------------------------------------------------------- int8

def calibration_images(model: clip_models.CLIP, batch: int, seed: int = 0) -> np.ndarray:
    """Preprocessed float32 images [N, 3, S, S] with the statistics of photographs, made here (no
    data is downloaded): colour noise with natural images' 1/f amplitude spectrum, its channels
    correlated as in photos, at random brightness and contrast, through the model's normalisation.
    Random-pixel noise would calibrate the activation ranges of a different distribution."""
    rng = np.random.default_rng(seed)
    size = model.image_size
    frequency = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    frequency[0, 0] = 1.0
    pixels = np.empty((batch, 3, size, size), np.uint8)
    for row in range(batch):
        phases = np.exp(2j * np.pi * rng.random((4, *frequency.shape)))
        fields = np.fft.irfft2(phases / frequency, s=(size, size))  # luminance + 3 colour fields
        fields = (fields - fields.mean((1, 2), keepdims=True)) / fields.std((1, 2), keepdims=True)
        colour = fields[0] + 0.35 * fields[1:]
        image = rng.uniform(0.3, 0.7, (3, 1, 1)) + rng.uniform(0.1, 0.25) * colour
        pixels[row] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return clip_models.normalize_pixels(torch.from_numpy(pixels)).numpy()


def quantize_graph(source: str | os.PathLike, model: clip_models.CLIP, tower: str, path: str | os.PathLike) -> Path:
    """The int8 graph of an fp32 tower graph (ONNX Runtime's quantization tools; weights int8 per
    output channel). Measured on 2 cores with VNNI (ViT-B-16, RoBERTa-base; docs/benchmarks.md): text graphs
    are quantized dynamically (each batch's activation ranges computed as it runs: no calibration;
    ONNX Runtime 3x torch fp32, cosine 0.9996), image graphs statically, their activation ranges
    calibrated once on `calibration_images` (QDQ: OpenVINO runs their linear layers and the patch
    convolution as int8 kernels, the attention products in f32; 2.9x its fp32, cosine 0.9998; dynamic image graphs gained nothing in either runtime)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    source, path = Path(source), Path(path)
    external = any(source.parent.glob(f"{source.name}.data"))
    if tower == "txt":
        with _root_records_dropped():
            quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=external)
        return path
    batches = iter(np.split(calibration_images(model, CALIBRATION_IMAGES), CALIBRATION_IMAGES // 8))

    class Calibration(CalibrationDataReader):
        def get_next(self):
            array = next(batches, None)
            return None if array is None else {INPUTS["img"]: array}

    with _root_records_dropped():
        quantize_static(source, path, Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"], use_external_data_format=external)
    return path


@contextlib.contextmanager
def _root_records_dropped() -> Iterator[None]:
    """ONNX Runtime's quantization tools log a line per tensor (and advice) to the root logger:
    dropped meanwhile; other loggers' records are kept."""
    root = logging.getLogger()
    drop = logging.Filter("-")  # passes no record of the root logger (its name is "root")
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ---------------------------------------------------------------- the job

def export_onnx(config: ExportConfig) -> list[ExportedGraph]:
    """cn_clip's pytorch_to_onnx.py: the asked towers in fp32 and fp16 (and int8), each checked against PyTorch."""
    model, _ = clip_models.load(config.source, download_root=config.download_root)
    model = model.float().eval()
    arch = model.config.struct_name().split("@")[0]
    if config.model_arch and config.pytorch_ckpt_path and arch != config.model_arch:
        raise ValueError(f"--pytorch-ckpt-path {config.pytorch_ckpt_path} holds a {arch} model, "
                         f"not --model-arch {config.model_arch}")
    config_io.check_context_length(config.context_length, model.config, config.source)
    towers = [t for t, wanted in (("txt", config.convert_text), ("img", config.convert_vision)) if wanted]
    out = []
    for tower in towers:
        for precision in (*GRAPH_PRECISIONS, INT8) if config.int8 else GRAPH_PRECISIONS:
            path = graph_path(config.save_onnx_path, tower, precision)
            if precision == INT8:
                quantize_graph(graph_path(config.save_onnx_path, tower, "fp32"), model, tower, path)
            else:
                export_graph(model, tower, precision, path)
            check = check_graph(path, model, tower, precision, lengths=(5, config.context_length))
            log.info("%s: %s", path, check)
            out.append(ExportedGraph(str(path), tower, precision, check))
    return out


# ---------------------------------------------------------------- the cache of the backends

def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip_platform" / "graphs")


def cached_graph(model: ModelInfo, tower: str, precision: str) -> Path:
    """The graph of `model`'s tower, exported (and checked) on first use, under a folder named by
    the checkpoint's fingerprint: the actors and replicas of one node export it once, the first
    one while the others wait, and later runs find it."""
    folder = cache_root() / model.key
    path = graph_path(folder / "model", tower, precision)
    if path.is_file():
        return path
    source = cached_graph(model, tower, "fp32") if precision == INT8 else None  # (takes the lock itself)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if path.is_file():
            return path
        log.info("%s the %s %s graph of %s to %s", "quantizing" if source else "exporting", tower, precision,
                 model.source, folder)
        loaded, _ = clip_models.load(model.source)
        loaded = loaded.float().eval()
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            made = graph_path(Path(tmp) / "model", tower, precision)
            if source:
                quantize_graph(source, loaded, tower, made)
            else:
                export_graph(loaded, tower, precision, made)
            log.info("%s: %s", path.name, check_graph(made, loaded, tower, precision))
            # Weights kept beside a big graph are named relative to it: move them first, the graph last.
            for file in sorted(Path(tmp).iterdir(), key=lambda f: f == made):
                os.replace(file, folder / file.name)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

