"""GPU paths: half precision through SDPA's flash kernels, DeepSpeed ZeRO-2 over NCCL in
bf16, the embed actor on a GPU, TensorRT engines and onnxruntime-gpu against torch. Skipped
cleanly on CPU-only machines (CI), and where tensorrt / onnxruntime-gpu are not installed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import clip_models
from clip_platform.encode import encode_images, encode_texts
from clip_platform.train import TrainConfig, run_finetune
from helpers import synthetic_lmdb

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def inputs(model: clip_models.CLIP, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(n, 3, model.image_size, model.image_size)
    tokens = torch.randint(106, 8000, (n, 52))
    tokens[:, 0], tokens[:, 20:] = 101, 0
    return images, tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_flash_attention_matches_fp32(dtype):
    model = clip_models.create_model("ViT-B-16@RoBERTa-wwm-ext-base-chinese").cuda().eval()
    images, tokens = (x.cuda() for x in inputs(model))
    with torch.no_grad():
        reference = model.encode_image(images), model.encode_text(tokens)
        with torch.autocast("cuda", dtype=dtype), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = model.encode_image(images)  # raises if the flash kernel cannot run these shapes
        with torch.autocast("cuda", dtype=dtype):
            half = model.encode_image(images), model.encode_text(tokens)
    assert F.cosine_similarity(flash.float(), reference[0]).min() > 0.999
    for ours, full in zip(half, reference):
        assert F.cosine_similarity(ours.float(), full).min() > 0.999


def test_embed_on_gpu_matches_cpu():
    model = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese").eval()
    images, tokens = inputs(model)
    cpu = encode_images(model, images.numpy()), encode_texts(model, tokens.numpy(), tokens.ne(0).sum(1).numpy())
    model.cuda()
    gpu = encode_images(model, images.numpy(), "bf16"), encode_texts(model, tokens.numpy(), tokens.ne(0).sum(1).numpy(),
                                                                     "bf16")
    for ours, full in zip(gpu, cpu):
        assert F.cosine_similarity(torch.as_tensor(ours).float(), torch.as_tensor(full).float()).min() > 0.999


def test_deepspeed_zero2_bf16_over_nccl(tmp_path, ray_local):
    lmdb = synthetic_lmdb(tmp_path / "data", num_train=64, num_valid=16)
    result = run_finetune(TrainConfig(
        train_data=str(lmdb / "train"), val_data=str(lmdb / "valid"), vision_model="ViT-Tiny",
        text_model="BERT-Tiny-chinese", batch_size=16, max_steps=4, workers=1, use_gpu=True, backend="deepspeed",
        zero_stage=2, precision="bf16", cpus_per_worker=0.5, num_workers=1, logs=str(tmp_path / "logs"),
        name="gpu", max_failures=0))
    assert result.final_metrics["step"] == 4
    model, _ = clip_models.load(str(result.checkpoint))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tensorrt_fp16_engine_matches_torch(tmp_path):
    """jobs/export_tensorrt.py's engines (profile batch 1..8, text length 1..52) run at batch 1, 3
    and 8 and text lengths 5 and 52, within cosine 0.999 of torch fp32."""
    pytest.importorskip("tensorrt")
    from clip_platform.deploy.onnx_export import export_graph, graph_path, sample_images, sample_tokens
    from clip_platform.deploy.tensorrt_build import TensorRTEngine, TensorRTConfig, export_tensorrt

    model = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese").eval()
    prefix = tmp_path / "tiny"
    for tower in ("img", "txt"):
        export_graph(model, tower, "fp32", graph_path(prefix, tower, "fp32"))
    paths = export_tensorrt(TensorRTConfig(str(prefix), convert_text=True, text_onnx_path=str(
        graph_path(prefix, "txt", "fp32")), convert_vision=True, vision_onnx_path=str(graph_path(prefix, "img", "fp32")),
        batch_size=8, fp16=True))
    engines = {path.split(".")[-3]: TensorRTEngine(path) for path in paths}
    for n in (1, 3, 8):
        for tower, arrays in (("img", [sample_images(model, n)]), ("txt", [sample_tokens(model, n, 5),
                                                                           sample_tokens(model, n, 52)])):
            for array in arrays:
                x = torch.from_numpy(array)
                with torch.no_grad():
                    expected = model.encode_image(x) if tower == "img" else model.encode_text(x)
                got = engines[tower](x).cpu()
                assert F.cosine_similarity(got, expected).min() > 0.999


def test_onnxruntime_gpu_backend_matches_torch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    import numpy as np

    from clip_platform.encode import ModelEncoder

    model = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese").eval()
    images, tokens = inputs(model)
    checkpoint = clip_models.save_checkpoint(model, tmp_path / "tiny.pt")
    torch_encoder = ModelEncoder(str(checkpoint), precision="fp32")
    for precision in ("fp32", "fp16"):
        encoder = ModelEncoder(str(checkpoint), precision=precision, backend="onnxruntime")
        assert "CUDAExecutionProvider" in encoder.graphs["img"].session.get_providers()
        for ours, theirs in ((encoder.encode_images(images.numpy()), torch_encoder.encode_images(images.numpy())),
                             (encoder.encode_texts(tokens.numpy()), torch_encoder.encode_texts(tokens.numpy()))):
            assert (np.asarray(ours) * np.asarray(theirs)).sum(1).min() > 0.999
