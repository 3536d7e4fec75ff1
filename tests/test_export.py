"""ONNX export and the graph backends, without Ray: jobs/export_onnx.py's graphs of the tiny
models and of random-weight RN50 and ViT-B-16 give the PyTorch features at batch 1, 3 and 17
and text lengths 5 and 52 (fp32 to 1e-4 relative, fp16 to cosine 0.999); the encoder gives the
same features on every backend; graphs are exported once per checkpoint; CLI mistakes are one line."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import clip_models
from clip_platform import cli
from clip_platform.encode import ModelEncoder
from clip_platform.batch.embed.config import EmbedConfig
from clip_platform.batch.zeroshot import ImageClassifier
from clip_platform.deploy import onnx_export
from clip_platform.deploy.onnx_export import export_graph, graph_path, sample_images, sample_tokens
from conftest import TINY_RN, TINY_VIT
from helpers import load_job, torch_features

BATCHES, LENGTHS = (1, 3, 17), (5, 52)


def assert_graphs_equal_torch(prefix, model: clip_models.CLIP, tower: str, fp16_batches=BATCHES) -> None:
    """The tower's fp32 graph at batches 1, 3 and 17 (texts at lengths 5 and 52, rows padded to
    different lengths) within 1e-4 relative of PyTorch, its fp16 graph within cosine 0.999 at
    `fp16_batches`. PyTorch runs once per input, at the largest batch."""
    sessions = {precision: onnxruntime.InferenceSession(str(graph_path(prefix, tower, precision)),
                                                        providers=["CPUExecutionProvider"])
                for precision in ("fp32", "fp16")}
    for length in LENGTHS if tower == "txt" else (0,):
        largest = max(BATCHES)
        array = sample_tokens(model, largest, length) if tower == "txt" else sample_images(model, largest)
        with torch.no_grad():
            x = torch.from_numpy(array)
            expected = (model.encode_text(x) if tower == "txt" else model.encode_image(x)).numpy()
        for precision, batches in (("fp32", BATCHES), ("fp16", fp16_batches)):
            for n in batches:
                got = sessions[precision].run(None, {"text" if tower == "txt" else "image": array[:n]})[0]
                assert got.shape == expected[:n].shape and got.dtype == np.float32
                if precision == "fp32":
                    error = np.linalg.norm(got - expected[:n], axis=1) / np.linalg.norm(expected[:n], axis=1)
                    assert error.max() <= 1e-4, (tower, n, length, error.max())
                else:
                    cosine = (got * expected[:n]).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
                        expected[:n], axis=1)
                    assert cosine.min() >= 0.999, (tower, n, length, cosine.min())


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    """Both tiny models exported by the job (all four graphs each): {struct: (model, prefix)}."""
    root = tmp_path_factory.mktemp("onnx")
    job = load_job("export_onnx")
    out = {}
    for struct in (TINY_VIT, TINY_RN):
        torch.manual_seed(0)
        model = clip_models.create_model(struct).eval()
        name = struct.split("@")[0]
        checkpoint = clip_models.save_checkpoint(model, root / f"{name}.pt")
        job.main(["--pytorch-ckpt-path", str(checkpoint), "--save-onnx-path", str(root / name),
                  "--convert-text", "--convert-vision"])
        out[struct] = model, root / name
    return out


@pytest.mark.parametrize("struct", [TINY_VIT, TINY_RN])
@pytest.mark.parametrize("tower", ["img", "txt"])
def test_tiny_graphs_equal_the_model(tiny_graphs, struct, tower):
    model, prefix = tiny_graphs[struct]
    for precision in ("fp32", "fp16"):
        graph = onnx.load(str(graph_path(prefix, tower, precision))).graph
        # cn_clip's names, float32 in and out (fp16 too), the batch (and the text length) symbolic.
        assert [i.name for i in graph.input] == ["image" if tower == "img" else "text"]
        assert [o.name for o in graph.output] == [f"unnorm_{'image' if tower == 'img' else 'text'}_features"]
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and (tower == "img" or dims[1].dim_param)
    assert_graphs_equal_torch(prefix, model, tower)


@pytest.fixture(scope="module", params=["RN50", "ViT-B-16"])
def released_architecture(request, tmp_path_factory):
    """A random-weight released architecture with its four graphs, exported once."""
    torch.manual_seed(0)
    model = clip_models.create_model(request.param).eval()
    prefix = tmp_path_factory.mktemp("onnx_big") / request.param
    for tower in ("img", "txt"):
        for precision in ("fp32", "fp16"):
            export_graph(model, tower, precision, graph_path(prefix, tower, precision))
    return model, prefix


@pytest.mark.slow
def test_released_architectures_export_and_equal_the_model(released_architecture):
    model, prefix = released_architecture
    # fp16 on ONNX Runtime's CPU (casts around its missing fp16 kernels) is slow: one batch.
    for tower in ("img", "txt"):
        assert_graphs_equal_torch(prefix, model, tower, fp16_batches=(3,))


def test_without_the_torchscript_exporter_the_dynamo_one_exports(tmp_path, monkeypatch, tiny_vit, caplog):
    """The TorchScript exporter is deprecated: where it fails, the dynamo exporter makes the same graph."""
    real_export = torch.onnx.export

    def no_torchscript(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript exporter was removed")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    path = export_graph(tiny_vit, "txt", "fp32", graph_path(tmp_path / "tiny", "txt", "fp32"))
    assert "dynamo exporter" in caplog.text or onnx_export._warned
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, length in ((1, 5), (3, 52)):
        tokens = sample_tokens(tiny_vit, n, length)
        with torch.no_grad():
            expected = tiny_vit.encode_text(torch.from_numpy(tokens)).numpy()
        np.testing.assert_allclose(session.run(None, {"text": tokens})[0], expected, atol=1e-5)


# ---------------------------------------------------------------- backends

@pytest.fixture
def graph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_export.CACHE_ENV, str(tmp_path / "graphs"))
    return tmp_path / "graphs"


def test_every_backend_gives_the_torch_features_and_exports_once(tmp_path, graph_cache, monkeypatch):
    checkpoint, _, pixels, (tokens, num_tokens), expected = torch_features(tmp_path, TINY_VIT)

    exports = []
    real_export = onnx_export.export_graph
    monkeypatch.setattr(onnx_export, "export_graph", lambda *a, **k: exports.append(a[1:3]) or real_export(*a, **k))
    for backend, precision in [("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp16"),
                               ("openvino", "bf16"), ("auto", "fp32")]:
        encoder = ModelEncoder(checkpoint, backend=backend, precision=precision)
        assert encoder.model is None and encoder.backend != "auto"
        got = encoder.encode_images(pixels), encoder.encode_texts(tokens, num_tokens)
        for ours, theirs in zip(got, expected):
            assert ours.shape == theirs.shape and ours.dtype == np.float32
            assert (ours * theirs).sum(1).min() >= 0.999, (backend, precision)
            if precision == "fp32":
                np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # One export per graph: fp32 and fp16, each tower; the second fp32 encoder found the cache.
    assert sorted(exports) == [("img", "fp16"), ("img", "fp32"), ("txt", "fp16"), ("txt", "fp32")]


def test_a_runtime_that_computes_nan_stops_the_encoder(tmp_path):
    checkpoint, _, pixels, (tokens, num_tokens), _ = torch_features(tmp_path, TINY_VIT)
    encoder = ModelEncoder(checkpoint, backend="torch", precision="fp32")
    encoder.graphs = {"img": lambda array: np.where(np.arange(len(array))[:, None] == 1, np.nan, 1.0)
                      .astype(np.float32) * np.ones((1, 8), np.float32)}
    with pytest.raises(RuntimeError, match=r"image encoder \(torch, fp32\) computed NaN or infinite features "
                                           r"for 1 of 2 inputs"):
        encoder.encode_images(pixels[:2])
    assert np.isfinite(encoder.encode_texts(tokens, num_tokens)).all()


def test_zero_shot_classifier_on_a_graph_backend(tmp_path, graph_cache):
    torch.manual_seed(0)
    model = clip_models.create_model(TINY_VIT).eval()
    checkpoint = str(clip_models.save_checkpoint(model, tmp_path / "tiny.pt"))
    classes = np.linalg.qr(np.random.default_rng(1).standard_normal((model.config.embed_dim, 4)))[0].astype(np.float32)
    images = sample_images(model, 3)
    batch = {"label": np.arange(3), "path": np.array(["a", "b", "c"], object), "image": images,
             "ok": np.array([True, False, True]), "error": np.array(["", "bad", ""], object)}
    torch_probs = ImageClassifier(checkpoint, classes, "fp32")(batch)["probs"]
    graph_probs = ImageClassifier(checkpoint, classes, "fp32", backend="openvino")(batch)["probs"]
    np.testing.assert_allclose(graph_probs, torch_probs, atol=1e-4)
    assert not graph_probs[1].any()


def test_a_backend_that_cannot_run_the_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="onnxruntime runs fp32 or fp16"):
        EmbedConfig(extract_text_feats=True, text_data=str(tmp_path / "t.jsonl"), vision_model="ViT-B-16",
                    backend="onnxruntime", precision="bf16")


# ---------------------------------------------------------------- command lines

def one_line_error(job: str, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job(job).main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_mistakes_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = clip_models.save_checkpoint(clip_models.create_model(TINY_VIT), tmp_path / "tiny.pt")
    prefix = str(tmp_path / "out" / "tiny")
    assert "nothing to do" in one_line_error("export_onnx", ["--pytorch-ckpt-path", str(checkpoint),
                                                             "--save-onnx-path", prefix], capsys)
    assert "not --model-arch RN50" in one_line_error(
        "export_onnx", ["--pytorch-ckpt-path", str(checkpoint), "--model-arch", "RN50", "--save-onnx-path", prefix,
                        "--convert-text"], capsys)
    assert "not found" in one_line_error("export_onnx", ["--pytorch-ckpt-path", str(tmp_path / "missing.pt"),
                                                         "--save-onnx-path", prefix, "--convert-text"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_tensorrt_export_without_cuda_is_one_line(tmp_path, capsys):
    graph = tmp_path / "t.txt.fp32.onnx"
    graph.write_bytes(b"")
    line = one_line_error("export_tensorrt", ["--convert-text", "--text-onnx-path", str(graph), "--fp16",
                                              "--save-tensorrt-path", str(tmp_path / "t")], capsys)
    assert "CUDA" in line
