"""GPU check: what only a GPU machine can measure, in one run of under 8 minutes, its figures
written to one JSON file (and printed):

* the GPU-marked tests (pytest -m gpu);
* the encoder's images/s and texts/s per backend at batch 256 (ViT-B-16 + RoBERTa-base, random
  weights), with each backend's cosine against torch fp32;
* a TensorRT fp16 engine (jobs/export_tensorrt.py's build) against torch fp16 autocast;
* ViT-B-16 finetuning at batch 128: samples/s and peak GPU memory with and without gradient
  checkpointing and FLIP (--mask-ratio 0.5), DDP and DeepSpeed ZeRO-2 over NCCL.

    make gpu-check                                   # = python benchmarks/gpu_check.py --output gpu_check.json
    python benchmarks/gpu_check.py --skip train      # parts: tests, embed, tensorrt, train

Without a CUDA device it stops in one line. A part that cannot run (no onnxruntime-gpu, no
tensorrt) is recorded as skipped with the reason; the budget is checked between steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import PeakSampler  # noqa: E402  (benchmarks/ is no package)

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 7.5 * 60  # the whole check, with its start-up
BATCH = 256
MODEL = "ViT-B-16"
PARTS = ("tests", "embed", "tensorrt", "train")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="gpu_check.json", help="where the figures go (default gpu_check.json)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out ({', '.join(PARTS)})")
    parser.add_argument("--train-steps", type=int, default=6, help="optimizer steps per training row")
    return parser.parse_args(argv)


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.start)


def timed_rate(fn, items: int, repeat: int = 5) -> float:
    """Items/s of fn() on the GPU: the best of `repeat` after a warm-up, synchronised."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        tick = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tick)
    return items / best


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# ---------------------------------------------------------------- parts

def gpu_tests(clock: Clock) -> dict:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], cwd=ROOT,
                         capture_output=True, text=True, timeout=max(60, clock.left - 240))
    lines = run.stdout.strip().splitlines()
    return {"exit_code": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:]}


def embed_backends(checkpoint: Path, clock: Clock) -> dict:
    """Encoder forward passes at batch BATCH per backend and precision (the embed job's actors run
    exactly this), with cosine against torch fp32."""
    import numpy as np
    import onnxruntime

    import clip_models
    from clip_platform.encode import ModelEncoder

    rng = np.random.default_rng(0)
    reference = ModelEncoder(str(checkpoint), precision="fp32", backend="torch")
    pixels = rng.integers(0, 256, (BATCH, 3, reference.info.image_size, reference.info.image_size), np.uint8)
    tokens = clip_models.tokenize([f"第{i}张图片：一只猫坐在红色的沙发上" for i in range(BATCH)]).numpy()
    num_tokens = (tokens != 0).sum(1)
    expected = reference.encode_images(pixels), reference.encode_texts(tokens, num_tokens)
    rows = {}
    gpu_ort = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    for backend, precision in (("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"),
                               ("onnxruntime", "fp32"), ("onnxruntime", "fp16")):
        name = f"{backend} {precision}"
        if backend == "onnxruntime" and not gpu_ort:
            rows[name] = {"skipped": "onnxruntime-gpu is not installed (CPUExecutionProvider only)"}
            continue
        if clock.left < 200:
            rows[name] = {"skipped": "time budget"}
            continue
        encoder = reference if (backend, precision) == ("torch", "fp32") else ModelEncoder(
            str(checkpoint), precision=precision, backend=backend)
        got = encoder.encode_images(pixels), encoder.encode_texts(tokens, num_tokens)
        rows[name] = {
            "images_per_s": timed_rate(lambda: encoder.encode_images(pixels), BATCH),
            "texts_per_s": timed_rate(lambda: encoder.encode_texts(tokens, num_tokens), BATCH),
            "cosine_images": cosine(got[0], expected[0]), "cosine_texts": cosine(got[1], expected[1]),
        }
        if backend == "onnxruntime":
            rows[name]["providers"] = encoder.graphs["img"].session.get_providers()
    rows["openvino"] = {"skipped": "a CPU runtime: measured by benchmarks/embed.py"}
    return rows


def tensorrt_vs_torch(checkpoint: Path, workdir: Path, clock: Clock) -> dict:
    """ViT-B-16 image and text towers: a TensorRT fp16 engine (profile batch 1..BATCH) against
    torch fp16 autocast, images/s and texts/s at BATCH, and cosine against torch fp32."""
    import torch

    import clip_models
    from clip_platform.deploy.onnx_export import export_graph, graph_path, sample_images, sample_tokens
    from clip_platform.deploy.tensorrt_build import TensorRTEngine, build_engine, engine_path

    if importlib.util.find_spec("tensorrt") is None:
        return {"skipped": "the tensorrt package is not installed"}
    cpu_model, _ = clip_models.load(str(checkpoint))
    graphs = {tower: export_graph(cpu_model, tower, "fp32", graph_path(workdir / "vit", tower, "fp32"))
              for tower in ("img", "txt")}  # exported (traced) on the CPU
    model = cpu_model.cuda().eval()
    out = {}
    for tower, onnx_path in graphs.items():
        if clock.left < 150:
            out[tower] = {"skipped": "time budget"}
            continue
        start = time.perf_counter()
        engine_file = engine_path(str(workdir / "vit"), tower, "fp16")
        engine_file.write_bytes(build_engine(onnx_path, tower, True, BATCH, 52))
        build_s = time.perf_counter() - start
        engine = TensorRTEngine(engine_file)
        array = sample_images(model, BATCH) if tower == "img" else sample_tokens(model, BATCH, 52)
        x = torch.from_numpy(array).cuda()
        encode = model.encode_image if tower == "img" else model.encode_text
        with torch.no_grad():
            fp32 = encode(x).float().cpu().numpy()

            def torch_fp16():
                with torch.autocast("cuda", dtype=torch.float16):
                    return encode(x)

            trt_out = engine(x).cpu().numpy()
            out[tower] = {"engine_build_s": build_s,
                          "tensorrt_fp16_per_s": timed_rate(lambda: engine(x), BATCH),
                          "torch_fp16_autocast_per_s": timed_rate(torch_fp16, BATCH),
                          "tensorrt_cosine_vs_torch_fp32": cosine(trt_out, fp32),
                          "torch_fp16_cosine_vs_fp32": cosine(torch_fp16().float().cpu().numpy(), fp32)}
        out[tower]["speedup"] = out[tower]["tensorrt_fp16_per_s"] / out[tower]["torch_fp16_autocast_per_s"]
    return out


def gpu_memory_mib() -> int:
    """GPU memory in use (nvidia-smi), the largest over the GPUs; 0 when it cannot be read."""
    try:
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=5).stdout.split()
        return max(int(u) for u in used)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def training(workdir: Path, steps: int, clock: Clock) -> dict:
    """ViT-B-16 + RoBERTa-base, batch 128, bf16, one GPU worker: samples/s (median after two
    warm-up steps) and peak GPU memory per row."""
    import json as json_module
    import statistics

    import ray

    from clip_platform.data import SyntheticConfig, make_synthetic
    from clip_platform.train import TrainConfig, run_finetune

    data = workdir / "train_data"
    make_synthetic(SyntheticConfig(str(data), num_train=128 * (steps + 1), num_valid=128, num_test=0, resolution=224,
                                   lmdb=True, zeroshot_per_class=0))
    rows = {}
    variants = [("ddp", dict(backend="ddp")),
                ("ddp + gradient checkpointing", dict(backend="ddp", grad_checkpointing=True)),
                ("ddp + FLIP 0.5", dict(backend="ddp", mask_ratio=0.5)),
                ("ddp + checkpointing + FLIP 0.5", dict(backend="ddp", grad_checkpointing=True, mask_ratio=0.5)),
                ("deepspeed zero-2 (nccl)", dict(backend="deepspeed", zero_stage=2))]
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    for name, options in variants:
        if clock.left < 60:
            rows[name] = {"skipped": "time budget"}
            continue
        logs = workdir / "logs"
        config = TrainConfig(train_data=str(data / "lmdb" / "train"), val_data=str(data / "lmdb" / "valid"),
                             vision_model="ViT-B-16", text_model="RoBERTa-wwm-ext-base-chinese", batch_size=128,
                             max_steps=steps, workers=1, use_gpu=True, precision="bf16", logs=str(logs), warmup=1,
                             num_workers=2, log_interval=10**6,
                             name=name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", ""),
                             max_failures=0, **options)
        try:
            with PeakSampler(gpu_memory_mib, interval=0.2) as memory:
                result = run_finetune(config)
        except Exception as error:  # noqa: BLE001 - one row failing is a figure too
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            continue
        metrics = [json_module.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        rates = [m["samples_per_s"] for m in metrics if "samples_per_s" in m][2:]
        rows[name] = {"samples_per_s": statistics.median(rates) if rates else None,
                      "peak_gpu_memory_mib": memory.peak}
    return rows


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): run it on a GPU "
              "machine, see docs/deployment.md's GPU check", file=sys.stderr)
        return 2
    import clip_models

    clock = Clock()
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    figures: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        checkpoint = clip_models.save_checkpoint(clip_models.create_model(MODEL).eval(), workdir / "vit-b-16.pt")
        for part, run in (("tests", lambda: gpu_tests(clock)),
                          ("embed", lambda: embed_backends(checkpoint, clock)),
                          ("tensorrt", lambda: tensorrt_vs_torch(checkpoint, workdir, clock)),
                          ("train", lambda: training(workdir, args.train_steps, clock))):
            if part in skip:
                continue
            start = time.perf_counter()
            try:
                figures[part] = run()
            except Exception as error:  # noqa: BLE001 - the other parts' figures still count
                figures[part] = {"error": f"{type(error).__name__}: {error}"[:1000]}
            figures[part + "_s"] = round(time.perf_counter() - start, 1)
            Path(args.output).write_text(json.dumps(figures, indent=2))  # what is measured so far survives a stop
    figures["total_s"] = round(time.perf_counter() - clock.start, 1)
    Path(args.output).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
