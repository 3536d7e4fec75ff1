"""The embed job and the one-command retrieval evaluation: a tiny random model,
synthetic data in tmp_path, the shared local Ray. Features must equal direct
`encode_*` calls; resumed runs skip finished shards; bad records are reported."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clip_models
from clip_models._torch_compat import packed_linear_ops
from clip_models.packed import PackedLinears
from clip_platform.batch.embed import store as embed_store
from clip_platform.batch.embed import EmbedActor, EmbedConfig
from clip_platform.encode import compiled_image_forward, encode_images, encode_texts
from clip_platform.encode import encoder as encoder_module
from clip_platform.batch.embed.source import IMAGES, MARKER_ROW, TEXTS
from clip_platform.data.records import stable_id
from clip_platform.batch.embed.store import ShardAssembler, ShardStore
from clip_platform.index.recall import compute_recall
from clip_platform.data.features import Features, read_features
from clip_platform.data import SyntheticConfig, iter_texts, make_synthetic
from helpers import load_job, write_tar_shards

TINY = "ViT-Tiny@BERT-Tiny-chinese"


def run_job(name: str, args: list[str], capsys) -> list[dict]:
    load_job(name).main(args)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """valid split: 24 images (TSV and LMDB) and their texts, plus a tiny checkpoint."""
    root = tmp_path_factory.mktemp("embed")
    make_synthetic(SyntheticConfig(str(root / "data"), num_train=1, num_valid=24, num_test=0, resolution=32,
                                   lmdb=True, zeroshot_per_class=0))
    torch.manual_seed(0)
    model = clip_models.create_model(TINY).eval()
    return root, clip_models.save_checkpoint(model, root / "tiny.pt"), model


def direct_image_features(model, tsv: Path) -> dict[int, np.ndarray]:
    """What cn_clip's extract_features.py computes: preprocess, encode, normalise."""
    preprocess = clip_models.image_transform(model.image_size)
    out = {}
    for line in tsv.read_text().splitlines():
        image_id, b64 = line.split("\t")
        image = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
        with torch.no_grad():
            feature = model.encode_image(preprocess(image)[None])
        out[int(image_id)] = (feature / feature.norm(dim=-1, keepdim=True))[0].numpy()
    return out


def direct_text_features(model, jsonl: Path) -> dict[int, np.ndarray]:
    """cn_clip's text path: its normalisation, tokens padded to 52, encode, normalise."""
    out = {}
    for record in iter_texts(jsonl):
        tokens = clip_models.tokenize([clip_models.preprocess_text(record.text)], 52)
        with torch.no_grad():
            feature = model.encode_text(tokens)
        out[record.text_id] = (feature / feature.norm(dim=-1, keepdim=True))[0].numpy()
    return out


def as_dict(features: Features) -> dict[int, np.ndarray]:
    assert len(np.unique(features.ids)) == len(features.ids), "an id appears twice"
    return dict(zip(features.ids.tolist(), features.vectors))


def assert_features_equal(got: dict[int, np.ndarray], expected: dict[int, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_allclose(got[key], vector, atol=2e-6, rtol=0)


# ---------------------------------------------------------------- the job through Ray

def test_job_features_equal_direct_encode_calls(ray_local, corpus, tmp_path, capsys):
    root, checkpoint, model = corpus
    data = root / "data"
    args = ["--extract-image-feats", "--extract-text-feats", "--image-data", str(data / "lmdb" / "valid" / "imgs"),
            "--text-data", str(data / "valid_texts.jsonl"), "--resume", str(checkpoint),
            "--output-dir", str(tmp_path / "out"), "--image-feat-output-path", str(tmp_path / "imgs.jsonl"),
            "--text-feat-output-path", str(tmp_path / "texts.jsonl"), "--rows-per-shard", "7",
            "--img-batch-size", "5", "--text-batch-size", "4"]
    texts, images = run_job("embed", args, capsys)
    assert (texts["modality"], images["modality"]) == ("texts", "images")
    assert images["num_features"] == 24 and images["num_shards"] == 4 and images["num_skipped"] == 0

    expected_images = direct_image_features(model, data / "valid_imgs.tsv")
    expected_texts = direct_text_features(model, data / "valid_texts.jsonl")
    # Parquet shards and cn_clip's JSONL both hold exactly the direct features.
    assert_features_equal(as_dict(read_features(tmp_path / "out" / "images")), expected_images)
    assert_features_equal(as_dict(read_features(tmp_path / "out" / "texts")), expected_texts)
    assert_features_equal(as_dict(read_features(tmp_path / "imgs.jsonl", "image_id")), expected_images)
    assert_features_equal(as_dict(read_features(tmp_path / "texts.jsonl", "text_id")), expected_texts)
    first = json.loads((tmp_path / "imgs.jsonl").read_text().splitlines()[0])
    assert list(first) == ["image_id", "feature"] and len(first["feature"]) == model.config.embed_dim


def test_without_output_dir_writes_cn_clip_default_paths(ray_local, corpus, tmp_path, capsys):
    root, checkpoint, model = corpus
    texts = tmp_path / "valid_texts.jsonl"
    texts.write_text((root / "data" / "valid_texts.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    args = ["--extract-image-feats", "--image-data", str(root / "data" / "valid_imgs.tsv"), "--text-data", str(texts),
            "--resume", str(checkpoint), "--precision", "bf16", "--rows-per-shard", "10"]
    [report] = run_job("embed", args, capsys)
    output = tmp_path / "valid_imgs.img_feat.jsonl"  # cn_clip's default, next to the texts
    assert report["output"] == str(output) and report["shards_dir"] is None
    assert not list(tmp_path.glob("*.parts"))  # the resume shards are gone once merged
    got = as_dict(read_features(output, "image_id"))
    expected = direct_image_features(model, root / "data" / "valid_imgs.tsv")
    assert got.keys() == expected.keys()
    cosine = min(float(got[k] @ expected[k]) for k in expected)  # both unit length
    assert cosine > 0.999


def test_resume_skips_finished_shards_and_each_id_appears_once(ray_local, corpus, tmp_path, capsys, monkeypatch):
    root, checkpoint, model = corpus
    out = tmp_path / "out"
    args = ["--extract-image-feats", "--image-data", str(root / "data" / "valid_imgs.tsv"),
            "--resume", str(checkpoint), "--output-dir", str(out), "--format", "jsonl", "--rows-per-shard", "4",
            "--img-batch-size", "3"]
    write = ShardStore.write
    calls = []

    def interrupted_write(self, shard, num_shards):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job dies after two shards
        calls.append(shard.shard)
        write(self, shard, num_shards)

    monkeypatch.setattr(ShardStore, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        run_job("embed", args, capsys)
    monkeypatch.setattr(ShardStore, "write", write)
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("part-*")}
    assert len(finished) == 2
    num_done = sum(len((out / "images" / name).read_text().splitlines()) for name in finished)

    [report] = run_job("embed", args, capsys)
    assert report["num_shards"] == 6 and report["num_shards_reused"] == 2
    assert report["num_encoded"] == 24 - num_done and report["num_features"] == 24
    assert all((out / "images" / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert_features_equal(as_dict(read_features(out / "images", "image_id")),
                          direct_image_features(model, root / "data" / "valid_imgs.tsv"))

    [again] = run_job("embed", args, capsys)  # nothing left to do
    assert again["num_shards_reused"] == 6 and again["num_encoded"] == 0 and again["num_features"] == 24


def jpeg(colour, size=20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_records_are_skipped_counted_and_listed(ray_local, corpus, tmp_path, capsys):
    root, checkpoint, model = corpus
    good = [base64.b64encode(jpeg((30 * i, 90, 200))).decode() for i in range(6)]
    (tmp_path / "messy_imgs.tsv").write_text("\n".join([
        f"1\t{good[0]}", f"2\t{base64.b64encode(jpeg((1, 2, 3))[:50]).decode()}",  # truncated JPEG
        "3\t@@@not base64@@@", f"4\t{good[1]}", "no tab on this line", f"5\t{good[2]}",
        f"1\t{good[3]}",  # id 1 again: the first is kept
        f"6\t{good[4]}", f"abc\t{good[5]}"]) + "\n")
    (tmp_path / "messy_texts.jsonl").write_text("\n".join([
        json.dumps({"text_id": 10, "text": "红色的圆形", "image_ids": [1]}), "{not json",
        json.dumps({"text_id": 11, "text": None}),
        json.dumps({"text_id": 12, "text": "“蓝色”的方形"})]) + "\n",
        encoding="utf-8")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "7.jpg").write_bytes(jpeg((200, 10, 10)))
    (folder / "sub" / "cat.png").write_bytes(jpeg((10, 200, 10)))
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    args = ["--extract-image-feats", "--extract-text-feats", "--image-data", str(tmp_path / "messy_imgs.tsv"),
            "--text-data", str(tmp_path / "messy_texts.jsonl"), "--resume", str(checkpoint),
            "--output-dir", str(tmp_path / "out"), "--rows-per-shard", "3", "--img-batch-size", "2"]
    texts, images = run_job("embed", args, capsys)

    assert images["num_features"] == 4 and images["num_skipped"] == 5
    assert images["skipped"]["counts"] == {"unreadable image": 1, "bad base64": 1, "malformed line": 1,
                                           "duplicate id": 1, "invalid id": 1}
    assert [r["id"] for r in images["skipped"]["examples"]["unreadable image"]] == [2]
    assert [r["id"] for r in images["skipped"]["examples"]["duplicate id"]] == [1]
    assert sorted(read_features(tmp_path / "out" / "images").ids.tolist()) == [1, 4, 5, 6]
    assert texts["num_features"] == 2 and texts["num_skipped"] == 2
    got = as_dict(read_features(tmp_path / "out" / "texts"))
    expected = direct_text_features(model, tmp_path / "messy_texts.jsonl")
    assert_features_equal(got, {k: v for k, v in expected.items() if k in (10, 12)})

    # An image folder: ids from numbered names, else a stable hash; the name is kept.
    [folder_report] = run_job("embed", ["--extract-image-feats", "--image-data", str(folder), "--resume",
                                        str(checkpoint), "--output-dir", str(tmp_path / "folder_out")], capsys)
    assert folder_report["num_features"] == 2
    assert folder_report["skipped"]["examples"]["unreadable image"][0]["id"] == "broken.jpg"
    table = pq.read_table(next((tmp_path / "folder_out" / "images").glob("part-*.parquet")))
    assert dict(zip(table.column("path").to_pylist(), table.column("id").to_pylist())) == {
        "7.jpg": 7, "sub/cat.png": stable_id("sub/cat.png")}

    # A Parquet corpus (id, image), cut along row groups.
    pq.write_table(pa.table({"id": [21, 22, 23], "image": [jpeg((1, 1, 1)), b"broken", jpeg((9, 9, 9))]}),
                   tmp_path / "corpus.parquet", row_group_size=1)
    [parquet_report] = run_job("embed", ["--extract-image-feats", "--image-data", str(tmp_path / "corpus.parquet"),
                                         "--resume", str(checkpoint), "--output-dir", str(tmp_path / "pq_out"),
                                         "--rows-per-shard", "2"], capsys)
    assert parquet_report["num_shards"] == 2 and parquet_report["skipped"]["counts"] == {"unreadable image": 1}
    assert sorted(read_features(tmp_path / "pq_out" / "images").ids.tolist()) == [21, 23]


def test_webdataset_shards_embed_by_key(ray_local, corpus, tmp_path, capsys):
    """img2dataset's tar shards: image and caption features keyed by the sample keys, a
    corrupt image skipped and named, a caption-only sample in the texts only, each good
    sample exactly once, through a brace pattern on a filesystem URI."""
    root, checkpoint, model = corpus
    data = root / "data"
    images = {}
    for line in (data / "valid_imgs.tsv").read_text().splitlines()[:5]:
        image_id, b64 = line.split("\t")
        images[int(image_id)] = base64.urlsafe_b64decode(b64)
    texts = {t.text_id: t.text for t in iter_texts(data / "valid_texts.jsonl")}
    captions = dict(zip(images, list(texts.values())[:5]))
    samples = [(f"{k:09d}", v, captions[k]) for k, v in images.items()]
    samples += [("000000900", b"corrupt bytes", "坏图"), ("000000901", None, "只有文字"), ("cat-photo", jpeg((5, 5, 5)), "猫")]
    write_tar_shards(tmp_path / "shards", samples, per_shard=3)
    pattern = f"file://{tmp_path}/shards/{{00000..00002}}.tar"
    texts_report, images_report = run_job("embed", [
        "--extract-image-feats", "--extract-text-feats", "--image-data", pattern, "--text-data", pattern,
        "--resume", str(checkpoint), "--output-dir", str(tmp_path / "out")], capsys)
    assert images_report["num_shards"] == 3 and images_report["num_features"] == 6
    assert images_report["skipped"]["counts"] == {"unreadable image": 1}
    assert images_report["skipped"]["examples"]["unreadable image"][0]["id"] == "000000900"  # named by its key
    got = as_dict(read_features(tmp_path / "out" / "images"))
    preprocess = clip_models.image_transform(model.image_size)
    with torch.no_grad():
        direct = {k: model.encode_image(preprocess(Image.open(io.BytesIO(v)))[None])[0] for k, v in images.items()}
    assert_features_equal({k: got[k] for k in images}, {k: (v / v.norm()).numpy() for k, v in direct.items()})
    assert stable_id("cat-photo") in got  # a non-numeric key: a stable 63-bit id, the key kept in `path`
    names = {}
    for part in (tmp_path / "out" / "images").glob("part-*.parquet"):
        table = pq.read_table(part)
        names.update(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))
    assert names[stable_id("cat-photo")] == "cat-photo"
    assert texts_report["num_features"] == 8 and texts_report["num_skipped"] == 0
    text_features = as_dict(read_features(tmp_path / "out" / "texts"))
    assert sorted(text_features) == sorted([*images, 900, 901, stable_id("cat-photo")])
    with torch.no_grad():
        tokens = clip_models.tokenize([clip_models.preprocess_text("只有文字")], 52)
        expected = model.encode_text(tokens)[0]
    np.testing.assert_allclose(text_features[901], (expected / expected.norm()).numpy(), atol=2e-6, rtol=0)


def test_retrieval_eval_end_to_end(ray_local, corpus, tmp_path, capsys):
    root, checkpoint, model = corpus
    out = tmp_path / "eval"
    job = load_job("retrieval_eval")
    job.main(["--data-dir", str(root / "data"), "--split", "valid", "--resume", str(checkpoint),
              "--output-dir", str(out), "--rows-per-shard", "10"])
    printed = capsys.readouterr().out
    assert "R@1" in printed and "text→image" in printed and "image→text" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"].endswith("lmdb/valid/imgs")  # LMDB preferred, as cn_clip evaluates

    # The same recalls from brute-force top-10 over the direct features.
    images = direct_image_features(model, root / "data" / "valid_imgs.tsv")
    texts = direct_text_features(model, root / "data" / "valid_texts.jsonl")
    image_ids, image_vecs = list(images), np.stack(list(images.values()))
    text_ids, text_vecs = list(texts), np.stack(list(texts.values()))
    scores = text_vecs @ image_vecs.T
    t2i = {t: [image_ids[j] for j in np.argsort(-scores[i], kind="stable")[:10]] for i, t in enumerate(text_ids)}
    i2t = {m: [text_ids[j] for j in np.argsort(-scores[:, i], kind="stable")[:10]] for i, m in enumerate(image_ids)}
    truth = {r.text_id: list(r.image_ids) for r in iter_texts(root / "data" / "valid_texts.jsonl")}
    truth_i2t: dict[int, list[int]] = {}
    for text_id, ids in truth.items():
        for image_id in ids:
            truth_i2t.setdefault(image_id, []).append(text_id)
    for mode, reference, predictions in (("t2i", truth, t2i), ("i2t", truth_i2t, i2t)):
        expected = compute_recall(reference, predictions).to_json()["scoreJson"]
        for key in ("r1", "r5", "r10", "mean_recall"):
            assert summary[mode][key] == pytest.approx(expected[key])
        assert json.loads((out / f"{mode}_recall.json").read_text())["success"] is True
    assert summary["mean_recall"] == pytest.approx((summary["t2i"]["mean_recall"] + summary["i2t"]["mean_recall"]) / 2)


@pytest.mark.parametrize("args, message", [
    ([], "nothing to do"),
    (["--extract-image-feats"], "--resume is required"),
    (["--extract-image-feats", "--resume", "/nonexistent/model.pt"], "not found"),
    (["--extract-text-feats", "--resume", "{ckpt}", "--text-data", "/nonexistent/texts.jsonl"], "matches no"),
    (["--extract-image-feats", "--resume", "{ckpt}", "--image-data", "{data}/valid_imgs.tsv",
      "--output-dir", "{other}"], "holds shards of another run"),
])
def test_cli_errors_are_one_line_exit_2(ray_local, corpus, tmp_path, capsys, args, message):
    from clip_platform import cli

    root, checkpoint, _ = corpus
    other = tmp_path / "other"
    store = ShardStore(other / "images", IMAGES)
    (other / "images").mkdir(parents=True)
    store.save_plan({"requested": 1, "input": {"kind": "tsv", "path": "elsewhere"}, "settings": {}})
    args = [a.format(ckpt=checkpoint, data=root / "data", other=other) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("embed").main, args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_compiled_image_encoders_give_the_direct_features(ray_local, corpus, tmp_path, capsys):
    root, checkpoint, model = corpus
    data = root / "data"
    args = ["--extract-image-feats", "--image-data", str(data / "valid_imgs.tsv"), "--resume", str(checkpoint),
            "--output-dir", str(tmp_path / "out"), "--img-batch-size", "5", "--compile", "on"]
    [images] = run_job("embed", args, capsys)
    assert images["num_features"] == 24 and images["num_skipped"] == 0
    # Inductor's kernels round differently from eager ones: equal to float32 precision.
    got = as_dict(read_features(tmp_path / "out" / "images"))
    expected = direct_image_features(model, data / "valid_imgs.tsv")
    assert got.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_allclose(got[key], vector, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend, precision", [("onnxruntime", "fp32"), ("auto", "int8")])
def test_graph_backends_give_the_torch_features(ray_local, corpus, tmp_path, capsys, backend, precision):
    """--backend onnxruntime: the actors export the tiny model's graphs (once per node, cached by
    the checkpoint's fingerprint) and encode with them; the features are torch's (cosine >= 0.999,
    in fact equal to float32 precision). --precision int8 (auto: OpenVINO for the images, ONNX
    Runtime for the texts): the int8 graphs' features are within cosine 0.99 of torch's fp32 ones.
    OpenVINO is switched to in the Serve test."""
    root, checkpoint, model = corpus
    data = root / "data"
    args = ["--extract-image-feats", "--extract-text-feats", "--image-data", str(data / "valid_imgs.tsv"),
            "--text-data", str(data / "valid_texts.jsonl"), "--resume", str(checkpoint), "--backend", backend,
            "--precision", precision, "--output-dir", str(tmp_path / "out"), "--img-batch-size", "5",
            "--text-batch-size", "7"]
    texts, images = run_job("embed", args, capsys)
    assert images["num_features"] == 24 and texts["num_features"] == texts["num_encoded"] > 0
    for modality, expected in (("images", direct_image_features(model, data / "valid_imgs.tsv")),
                               ("texts", direct_text_features(model, data / "valid_texts.jsonl"))):
        got = as_dict(read_features(tmp_path / "out" / modality))
        assert got.keys() == expected.keys()
        cosines = [float(np.dot(got[key], vector)) for key, vector in expected.items()]
        assert min(cosines) >= (0.99 if precision == "int8" else 0.999), (modality, min(cosines))
        if precision == "fp32":
            for key, vector in expected.items():
                np.testing.assert_allclose(got[key], vector, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- pieces, without Ray

def test_texts_padded_to_the_batch_longest_give_the_same_features(tiny_vit):
    texts = ["红色的圆形", "左上角有三个蓝色的菱形和一个很长的描述文字"]
    full = clip_models.tokenize(texts, 52).numpy()
    num_tokens = (full != 0).sum(axis=1)
    trimmed = encode_texts(tiny_vit, full, num_tokens)
    with torch.no_grad():
        padded = tiny_vit.encode_text(torch.from_numpy(full))
    np.testing.assert_allclose(trimmed, (padded / padded.norm(dim=-1, keepdim=True)).numpy(), atol=2e-6)


def test_compiled_forward_pads_short_batches_to_one_graph(tiny_vit):
    pixels = torch.randint(0, 256, (4, 3, tiny_vit.image_size, tiny_vit.image_size), dtype=torch.uint8)
    torch._dynamo.utils.counters.clear()
    forward = compiled_image_forward(tiny_vit, batch_size=4)
    eager = encode_images(tiny_vit, pixels.numpy())
    np.testing.assert_allclose(encode_images(tiny_vit, pixels.numpy(), forward=forward), eager, atol=2e-5)
    np.testing.assert_allclose(encode_images(tiny_vit, pixels[:3].numpy(), forward=forward), eager[:3], atol=2e-5)
    np.testing.assert_allclose(encode_images(tiny_vit, pixels[:1].numpy(), forward=forward), eager[:1], atol=2e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_without_inductor_freezing_the_encoder_runs_eager(corpus, monkeypatch):
    _, checkpoint, model = corpus
    monkeypatch.setattr(encoder_module, "inductor_freezing", lambda: None)  # what _torch_compat gives then
    assert compiled_image_forward(model, batch_size=4) is None
    encoder = EmbedActor(str(checkpoint), IMAGES, "fp32", compile_batch=4)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, model.image_size, model.image_size), np.uint8)
    assert encoder.forward is None
    np.testing.assert_allclose(encoder.encode_images(pixels), encode_images(model, pixels), atol=2e-6)


def test_encoder_falls_back_to_eager_when_compiling_fails(corpus, monkeypatch):
    _, checkpoint, model = corpus

    def broken_compile(*args, **kwargs):
        def forward(pixels):
            raise RuntimeError("inductor: no C++ compiler found")
        return forward

    monkeypatch.setattr(encoder_module, "compiled_image_forward", broken_compile)
    encoder = EmbedActor(str(checkpoint), IMAGES, "fp32", compile_batch=4)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, model.image_size, model.image_size), np.uint8)
    features = encoder.encode_images(pixels)
    assert encoder.forward is None  # later batches go straight to eager
    np.testing.assert_allclose(features, encode_images(model, pixels), atol=2e-6)


def test_bf16_cpu_encoder_gives_the_direct_autocast_features(corpus):
    _, checkpoint, model = corpus
    encoder = EmbedActor(str(checkpoint), TEXTS, "bf16")
    assert isinstance(encoder.linears["txt"], PackedLinears) == (packed_linear_ops("cpu") is not None)
    tokens = clip_models.tokenize(["一只猫", "两只狗在草地上", "xyz"])
    num_tokens = (tokens != 0).sum(1)
    batch = {"text_id": np.arange(3), "path": np.array([""] * 3, object), "shard": np.zeros(3, int),
             "row": np.arange(3), "note": np.array([""] * 3, object), "ok": np.array([True, False, True]),
             "tokens": tokens.numpy(), "num_tokens": num_tokens.numpy()}
    out = encoder(batch)
    expected = encode_texts(model, tokens.numpy()[[0, 2]], num_tokens.numpy()[[0, 2]], "bf16")
    np.testing.assert_allclose(out["feature"][[0, 2]], expected, atol=5e-3)
    assert not out["feature"][1].any()


def encoded_rows(shard: int, rows: list[int], ok: list[bool] | None = None) -> dict[str, np.ndarray]:
    n = len(rows)
    ok = ok if ok is not None else [True] * n
    notes = ["" if good else json.dumps({"kind": "unreadable image", "id": 100 + r, "where": "", "detail": ""})
             for r, good in zip(rows, ok)]
    return {"text_id": np.array([100 + r for r in rows]), "path": np.array([""] * n, object),
            "shard": np.full(n, shard), "row": np.array(rows), "note": np.array(notes, object),
            "ok": np.array(ok), "feature": np.array([[r, 1.0] for r in rows], np.float32)}


def marker(shard: int, num_rows: int) -> dict[str, np.ndarray]:
    bad = [{"kind": "bad base64", "id": 9, "where": "", "detail": ""}]
    note = json.dumps({"num_rows": num_rows, "bad_records": bad})
    return {"text_id": np.array([0]), "path": np.array([""], object), "shard": np.array([shard]),
            "row": np.array([MARKER_ROW]), "note": np.array([note], object), "ok": np.array([False]),
            "feature": np.zeros((1, 2), np.float32)}


def concat(*batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_assembler_hands_over_a_shard_once_all_rows_arrived_in_any_order():
    assembler = ShardAssembler(TEXTS)
    assert assembler.add(concat(encoded_rows(0, [2, 0]), marker(0, 4), encoded_rows(1, [0]))) == []
    assert assembler.add(encoded_rows(0, [0])) == []  # a retried task delivers row 0 again
    shard0, shard1 = assembler.add(concat(encoded_rows(0, [3, 1], ok=[False, True]), marker(1, 1)))
    assert shard0.shard == 0 and shard0.num_rows == 4 and shard0.features.ids.tolist() == [100, 101, 102]
    assert [r["kind"] for r in shard0.bad_records] == ["bad base64", "unreadable image"]
    assert shard1.features.ids.tolist() == [100] and not assembler.pending
    [empty] = ShardAssembler(TEXTS).add(marker(5, 0))
    assert len(empty.features) == 0


def test_store_drops_ids_repeated_across_shards_and_stays_idempotent(tmp_path):
    store = ShardStore(tmp_path, TEXTS, "parquet")
    vectors = np.eye(3, dtype=np.float32)
    for shard, ids in enumerate(([1, 2, 3], [4, 2, 5])):
        store.write(embed_store.FinishedShard(shard, 3, Features(np.array(ids), vectors), None), 2)
    assert store.drop_duplicate_ids(2) == 1 and store.drop_duplicate_ids(2) == 0
    assert sorted(read_features(tmp_path).ids.tolist()) == [1, 2, 3, 4, 5]
    num_features, summary = store.summary(2)
    assert num_features == 5 and summary.counts == {"duplicate id": 1} and summary.ids() == [2]
    assert store.merge_jsonl(2, tmp_path / "all.jsonl") == 5


def test_config_validates_user_mistakes():
    with pytest.raises(ValueError, match="precision"):
        EmbedConfig(extract_image_feats=True, resume="x.pt", precision="int8")
    with pytest.raises(ValueError, match="compile"):
        EmbedConfig(extract_image_feats=True, resume="x.pt", compile="yes")
    with pytest.raises(ValueError, match="rows_per_shard"):
        EmbedConfig(extract_image_feats=True, resume="x.pt", rows_per_shard=0)
    assert stable_id("123.jpg") == 123 and stable_id("a/123.jpg") != 123 and stable_id("x.png") == stable_id("x.png")


def test_webdataset_corpus_rows_are_estimated_from_the_shards(tmp_path):
    """--compile auto and the progress figures need a row estimate: samples, not shard files."""
    from clip_platform.batch.embed.source import plan_corpus

    write_tar_shards(tmp_path, [(f"{i:06d}", jpeg((i, i, i)), "文字") for i in range(30)], per_shard=10)
    plan = plan_corpus(f"{tmp_path}/*.tar", IMAGES, rows_per_shard=10000)
    assert plan.num_shards == 3 and 24 <= plan.estimated_rows <= 36
