"""--backend of the embed and zero-shot jobs and of Serve: what runs a tower.

* `torch`        the PyTorch model (autocast, oneDNN-packed bf16 linears, torch.compile):
                 encoder.py.
* `onnxruntime`  the tower's ONNX graph in ONNX Runtime: fp32, or the fp16 graph for fp16; on a
                 GPU through onnxruntime-gpu's TensorRT or CUDA provider when installed.
* `openvino`     the fp32 graph compiled by OpenVINO for the CPU, computing in bf16 (or f16) when
                 asked and the CPU has those instructions, else fp32.
* `auto`         torch on GPUs; on CPUs OpenVINO when installed, else torch; for --precision
                 int8, OpenVINO for images and ONNX Runtime for texts. Measured on 2 cores
                 (ViT-B-16 and RoBERTa-base, figures in docs/benchmarks.md): with
                 AVX512-BF16, OpenVINO bf16 was the fastest path by far; without it, the fp32
                 runtimes were within the noise of each other (OpenVINO ahead on images in the
                 interleaved run) while bf16 asked of torch is emulated and 2-3x slower, and of
                 OpenVINO falls back to fp32: OpenVINO is never the slow choice.

--precision int8 (CPUs only) runs the towers' int8 graphs (onnx_export.quantize_graph): with VNNI
(AVX512 or AVX) or AMX, int8 matmuls do 4x the work of fp32 ones per instruction. Measured on the
2-core Xeon without bf16 (ViT-B-16, RoBERTa-base, random weights, batch 16 images / 64 texts,
2 threads, one run): images OpenVINO int8 9.1/s against OpenVINO fp32 3.1, torch fp32 2.4 and
ONNX Runtime int8 3.1; texts ONNX Runtime int8 59/s against torch fp32 20, OpenVINO int8 36.
Features within cosine 0.9996 (texts) and 0.9998 (images) of fp32. On the 2-core Xeon with AMX
(session 10, same batches, best of 3) bf16 was the faster path: images OpenVINO bf16 36/s against
int8 20 (OpenVINO, bf16 between the int8 kernels; 24 with f32 there, as now) and 16 (ONNX Runtime);
texts OpenVINO bf16 405/s against ONNX Runtime int8 344.
So int8 asked on a CPU with native bf16 runs as asked, with a warning that names bf16.

The graphs come from onnx_export.cached_graph: exported once per checkpoint and node.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

import numpy as np
import torch

from ..model_info import ModelInfo
from ..deploy.onnx_export import INPUTS, INT8, cached_graph

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
_OPENVINO_HINTS = {"bf16": ("BF16", "bf16"), "fp16": ("FP16", "f16")}  # precision -> (CPU capability, hint)


def check_backend(backend: str, precision: str) -> None:
    """ValueError for a backend that does not exist or cannot run `precision`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime" and precision == "bf16":
        raise ValueError("--backend onnxruntime runs fp32 or fp16 graphs: for bf16 use --backend openvino or torch")
    if backend == "torch" and precision == INT8:
        raise ValueError("--precision int8 runs int8 ONNX graphs: use --backend auto, onnxruntime or openvino")


def choose_backend(backend: str, precision: str, device: torch.device | str, tower: str = "img") -> str:
    """The backend `auto` means on `device` for `precision` and `tower` ("img" or "txt"; others
    are returned as given). ValueError for int8 on a GPU."""
    check_backend(backend, precision)
    cpu = torch.device(device).type == "cpu"
    if precision == INT8 and not cpu:
        raise ValueError("--precision int8 runs on CPUs (VNNI/AMX int8 kernels); on GPUs use fp16 or bf16")
    if precision == INT8:
        _advise_bf16()
    if backend != "auto":
        return backend
    if not cpu:
        return "torch"  # autocast + SDPA's flash kernels; the GPU runtimes are compared by `make gpu-check`
    openvino = importlib.util.find_spec("openvino") is not None
    if precision == INT8:
        return "openvino" if tower == "img" and openvino else "onnxruntime"
    return "openvino" if openvino else "torch"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as OpenVINO sees it: without,
    torch's bf16 is emulated and slower than fp32."""
    if importlib.util.find_spec("openvino") is None:
        return False
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@functools.cache
def _advise_bf16() -> None:
    """Once per process: int8 asked where bf16 is native, and was measured faster (module docs)."""
    if cpu_has_bf16():
        log.warning("--precision int8 on a CPU that computes bf16 natively: --precision bf16 measured "
                    "faster here (ViT-B-16: 36 images/s against 24 in int8) and closer to fp32")


def graph_precision(backend: str, precision: str) -> str:
    """The exported graph a backend reads: the int8 graph for int8, ONNX Runtime's fp16 graph for
    fp16, else fp32 (OpenVINO lowers the fp32 graph's precision itself)."""
    if precision == INT8:
        return INT8
    return "fp16" if backend == "onnxruntime" and precision == "fp16" else "fp32"


class GraphTower:
    """One tower's graph loaded into a runtime: inputs [N, ...] -> unnormalised features [N, D]."""

    backend = ""

    def __call__(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxRuntimeTower(GraphTower):
    backend = "onnxruntime"

    def __init__(self, path, tower: str, precision: str, device: torch.device, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads sleep rather than spin: they share the node's cores with the decode tasks
        # (measured with the 2-core machine busy, RoBERTa-base int8, 64 texts, interleaved: 29.5
        # texts/s spinning against 43.5 not).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = onnxruntime.get_available_providers()
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            if "TensorrtExecutionProvider" in available:
                providers.insert(0, ("TensorrtExecutionProvider", {
                    "device_id": device.index or 0, "trt_fp16_enable": precision == "fp16",
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(path.parent)}))
        self.input = INPUTS[tower]
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: array})[0]


class OpenVINOTower(GraphTower):
    backend = "openvino"

    def __init__(self, path, tower: str, precision: str, device: torch.device, threads: int):
        import openvino

        core = openvino.Core()
        # int8 graphs: the int8 kernels, f32 for the rest (on the Xeon with AMX, ViT-B-16 batch 16,
        # interleaved: 23.6-24.2 images/s against 19.7-20.5 with bf16 for the rest).
        capability, hint = _OPENVINO_HINTS.get(precision, ("FP32", "f32"))
        if capability not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log.info("OpenVINO: this CPU has no %s instructions: computing in fp32", capability)
            hint = "f32"
        # Compiled blobs, so later starts skip compiling: one folder per inference precision. In a
        # shared folder, the bf16 compile of a graph compiled in f32 before gave NaN image features
        # (OpenVINO 2026.4, a CPU with AMX: tests/test_export.py's backend test, ViT-Tiny).
        core.set_property({"CACHE_DIR": str(path.parent / "openvino" / hint)})
        # No pinning of its threads to cores: the node's decode tasks and other processes share
        # them, and a pinned thread waiting for its core stalls the whole inference (measured with
        # the 2-core machine busy, ViT-B-16 int8, batch 16, interleaved: 2.3 images/s pinned
        # against 5.9 not).
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_NUM_THREADS": threads,
                                                         "ENABLE_CPU_PINNING": False})
        self.request = compiled.create_infer_request()

    def __call__(self, array: np.ndarray) -> np.ndarray:
        self.request.infer({0: array})
        return self.request.get_output_tensor(0).data.copy()


def open_tower(backend: str, model: ModelInfo, tower: str, precision: str, device: torch.device,
               threads: int = 0) -> GraphTower:
    """`model`'s tower ("img" or "txt") in the runtime `backend` (onnxruntime or openvino), its
    graph exported first if this node has not cached it. threads 0: torch's thread count."""
    path = cached_graph(model, tower, graph_precision(backend, precision))
    kind = {"onnxruntime": OnnxRuntimeTower, "openvino": OpenVINOTower}[backend]
    return kind(path, tower, precision, torch.device(device), threads or torch.get_num_threads())
