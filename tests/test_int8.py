"""--precision int8, without Ray: the int8 graphs (text: dynamic quantization; images: static,
calibrated on made-up photographs) are quantized once per checkpoint from the fp32 graphs and
give features within cosine 0.99 of fp32 PyTorch on every backend that runs them; `auto` runs
images on OpenVINO and texts on ONNX Runtime; where int8 cannot run, one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import clip_models
from clip_platform import cli
from clip_platform.encode import ModelEncoder
from clip_platform.batch.embed.config import EmbedConfig
from clip_platform.deploy import onnx_export
from clip_platform.encode import backends as runtimes
from clip_platform.encode.backends import choose_backend
from conftest import TINY_RN, TINY_VIT
from helpers import load_job, torch_features


@pytest.fixture
def graph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_export.CACHE_ENV, str(tmp_path / "graphs"))
    return tmp_path / "graphs"


@pytest.mark.parametrize("struct", [TINY_VIT, TINY_RN])
def test_int8_graphs_are_quantized_once_and_close_to_fp32(tmp_path, graph_cache, monkeypatch, struct):
    # Images the calibration did not see (it uses seed 0).
    checkpoint, _, images, (tokens, num_tokens), expected = torch_features(
        tmp_path, struct, lambda model: onnx_export.calibration_images(model, 5, seed=7))

    quantized = []
    real = onnx_export.quantize_graph
    monkeypatch.setattr(onnx_export, "quantize_graph", lambda *a, **k: quantized.append(a[2]) or real(*a, **k))
    for backend, runs in (("auto", "onnxruntime+openvino"), ("onnxruntime", "onnxruntime"),
                          ("openvino", "openvino")):
        encoder = ModelEncoder(checkpoint, backend=backend, precision="int8")
        assert encoder.model is None and encoder.backend == runs
        got = encoder.encode_images(images), encoder.encode_texts(tokens, num_tokens)
        for ours, theirs in zip(got, expected):
            assert ours.shape == theirs.shape and ours.dtype == np.float32
            cosine = (ours * theirs).sum(1)
            assert cosine.min() >= 0.99 and not np.allclose(ours, theirs, atol=1e-6), (backend, cosine.min())
    assert sorted(quantized) == ["img", "txt"]  # once per tower; the later encoders found the cache

    # Really int8: the image graph in QDQ form (int8 weights, calibrated activation scales), the
    # text graph with integer matmuls whose activations are quantized as it runs.
    folder = next(graph_cache.iterdir())
    ops = {tower: {node.op_type for node in onnx.load(str(folder / f"model.{tower}.int8.onnx")).graph.node}
           for tower in ("img", "txt")}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["img"]
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops["txt"]


def test_calibration_images_look_like_photographs():
    """Not noise: most of their energy is in low spatial frequencies, and they vary in colour."""
    torch.manual_seed(0)
    model = clip_models.create_model(TINY_VIT)
    images = onnx_export.calibration_images(model, 4)
    assert images.shape == (4, 3, model.image_size, model.image_size) and images.dtype == np.float32

    def low_frequency_share(array):  # of the power at spatial frequencies under 4 cycles per image
        power = np.abs(np.fft.rfft2(array - array.mean((2, 3), keepdims=True))) ** 2
        return (power[..., :4, :4].sum() + power[..., -3:, :4].sum()) / power.sum()

    assert low_frequency_share(images) > 0.3  # 0.56 here; white noise: 28 of S x (S/2 + 1) frequencies, 0.05
    assert low_frequency_share(images) > 5 * low_frequency_share(onnx_export.sample_images(model, 4))
    assert np.std(images.mean((2, 3)), axis=0).min() > 0.05  # per-channel means differ between images
    np.testing.assert_array_equal(images, onnx_export.calibration_images(model, 4))  # deterministic


def test_int8_where_it_cannot_run_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="int8 runs int8 ONNX graphs: use --backend auto"):
        EmbedConfig(extract_text_feats=True, text_data=str(tmp_path / "t.jsonl"), vision_model="ViT-B-16",
                    backend="torch", precision="int8")
    with pytest.raises(ValueError, match="int8 runs on CPUs"):
        choose_backend("auto", "int8", "cuda", "img")
    assert choose_backend("auto", "int8", "cpu", "txt") == "onnxruntime"
    # The embed job's default backend is torch: --precision int8 alone is one line, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("embed").main, ["--extract-text-feats", "--text-data", str(tmp_path / "t.jsonl"),
                                         "--vision-model", "ViT-B-16", "--precision", "int8"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--precision int8 runs int8 ONNX graphs" in line, line


@pytest.mark.parametrize("native_bf16", [True, False])
def test_int8_on_a_cpu_with_native_bf16_names_bf16_once(monkeypatch, caplog, native_bf16):
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: native_bf16)
    runtimes._advise_bf16.cache_clear()
    for tower in ("img", "txt", "img"):
        choose_backend("auto", "int8", "cpu", tower)
    choose_backend("openvino", "int8", "cpu", "img")
    runtimes._advise_bf16.cache_clear()
    advice = [r.getMessage() for r in caplog.records if "--precision bf16" in r.getMessage()]
    assert len(advice) == (1 if native_bf16 else 0), advice


def test_export_job_writes_checked_int8_graphs(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = clip_models.save_checkpoint(clip_models.create_model(TINY_VIT).eval(), tmp_path / "tiny.pt")
    prefix = tmp_path / "deploy" / "tiny"
    load_job("export_onnx").main(["--pytorch-ckpt-path", str(checkpoint), "--save-onnx-path", str(prefix),
                                  "--convert-text", "--convert-vision", "--int8"])
    graphs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((g["tower"], g["precision"]) for g in graphs) == [
        (tower, precision) for tower in ("img", "txt") for precision in ("fp16", "fp32", "int8")]
    for graph in graphs:
        assert Path(graph["path"]).is_file() and graph["path"] == str(
            onnx_export.graph_path(prefix, graph["tower"], graph["precision"]))
        if graph["precision"] == "int8":
            assert "min cosine" in graph["check"] and "needs >= 0.99" in graph["check"], graph["check"]
