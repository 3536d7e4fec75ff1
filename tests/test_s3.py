"""Paths on object storage, against a real S3 server on loopback (moto's server mode): the embed
job reads webdataset shards from a bucket, writes its feature shards into one and resumes from the
shards already there; finetuning reads shards from a bucket and checkpoints into it; an index
built from features in a bucket equals the one built from the same local files; a scheme no
filesystem knows, a missing bucket and an output that must stay local are refused in one line."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

import clip_models
from clip_platform.batch.embed.store import ShardStore
from clip_platform.data import SyntheticConfig, make_synthetic
from clip_platform.data.features import read_features
from clip_platform.data.records import b64decode_image
from conftest import S3_ENV
from helpers import load_job, write_tar_shards

TINY = "ViT-Tiny@BERT-Tiny-chinese"


@pytest.fixture(scope="module")
def s3():
    """(a URI query reaching the server, a pyarrow S3FileSystem on it) with the bucket `features`."""
    from moto.server import ThreadedMotoServer

    for name, value in S3_ENV.items():
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True)
    fs.create_dir("features")
    yield f"endpoint_override={host}:{port}&scheme=http", fs
    server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    make_synthetic(SyntheticConfig(str(root / "data"), num_train=1, num_valid=12, num_test=0, resolution=32,
                                   zeroshot_per_class=0))
    torch.manual_seed(0)
    return root, clip_models.save_checkpoint(clip_models.create_model(TINY).eval(), root / "tiny.pt")


def run_embed(args: list[str], capsys) -> dict:
    load_job("embed").main(args)
    [report] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return report


def test_embed_writes_its_shards_into_the_bucket_and_resumes_from_them(ray_local, s3, corpus, tmp_path, capsys,
                                                                       monkeypatch):
    query, fs = s3
    root, checkpoint = corpus
    monkeypatch.chdir(tmp_path)  # a local folder named "s3:" would appear here
    # img2dataset's layout: webdataset shards, here in the bucket and in a local copy.
    lines = (root / "data" / "valid_imgs.tsv").read_text().splitlines()
    samples = [(f"{int(i):09d}", b64decode_image(b64), None) for i, b64 in (line.split("\t") for line in lines)]
    for path in write_tar_shards(tmp_path / "shards", samples, per_shard=5):
        pafs.copy_files(str(path), f"features/shards/{path.name}", destination_filesystem=fs)
    common = ["--extract-image-feats", "--resume", str(checkpoint), "--rows-per-shard", "4", "--img-batch-size", "4"]
    local = run_embed(common + ["--image-data", str(tmp_path / "shards"), "--output-dir", str(tmp_path / "local")],
                      capsys)
    common += ["--image-data", f"s3://features/shards?{query}"]
    uri = f"s3://features/run?{query}"

    write, calls = ShardStore.write, []

    def interrupted_write(self, shard, num_shards):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the job dies after its first shard
        calls.append(shard.shard)
        write(self, shard, num_shards)

    monkeypatch.setattr(ShardStore, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        run_embed(common + ["--output-dir", uri], capsys)
    monkeypatch.setattr(ShardStore, "write", write)
    report = run_embed(common + ["--output-dir", uri], capsys)

    assert report["shards_dir"] == f"s3://features/run/images?{query}"
    assert (report["num_shards"], report["num_shards_reused"], report["num_features"]) == (3, 1, 12)
    assert not any(name.startswith("s3") for name in os.listdir(tmp_path))
    names = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector("features/run/images")))
    assert names == ["_plan.json", "_shards", "_summary.json", "part-00000-of-00003.parquet",
                     "part-00001-of-00003.parquet", "part-00002-of-00003.parquet"]  # one shard per tar file
    remote = pq.read_table("features/run/images", filesystem=fs)
    expected = read_features(local["shards_dir"], "image_id")
    order = remote.column("id").to_numpy().argsort()
    assert sorted(remote.column("id").to_pylist()) == sorted(expected.ids.tolist())
    got = torch.tensor(remote.column("feature").to_pylist())[order]
    torch.testing.assert_close(got, torch.from_numpy(expected.vectors[expected.ids.argsort()]), atol=2e-6, rtol=0)

    again = run_embed(common + ["--output-dir", uri], capsys)  # everything is in the bucket already
    assert (again["num_shards_reused"], again["num_encoded"]) == (3, 0)


@pytest.mark.parametrize("output, message", [
    ("foo://bucket/x", "foo://bucket/x: Unrecognized filesystem type in URI"),
    ("s3://no-such-bucket/x?{query}", "no-such-bucket does not exist; create it first"),
])
def test_an_output_uri_that_cannot_be_written_is_one_line(s3, corpus, capsys, output, message):
    from clip_platform import cli

    root, checkpoint = corpus
    args = ["--output-dir", output.format(query=s3[0])]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("embed").main, ["--extract-image-feats", "--image-data",
                                         str(root / "data" / "valid_imgs.tsv"), "--resume", str(checkpoint), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_outputs_that_stay_local_refuse_a_uri_in_one_line(s3, tmp_path, capsys):
    from clip_platform import cli

    query, _ = s3
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("build_index").main, ["--features", str(tmp_path), "--output", f"s3://features/index?{query}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "FAISS memory-maps it" in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("knn").main, ["--image-feats", str(tmp_path), "--text-feats", str(tmp_path), "--index",
                                       "faiss", "--output", f"s3://features/predictions.jsonl?{query}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "builds its temporary index beside --output" in err, err
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("retrieval_eval").main, ["--data-dir", str(tmp_path), "--vision-model", "ViT-B-16",
                                                  "--output-dir", f"s3://features/eval?{query}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "not URIs" in err and len(err.splitlines()) == 1, err


def test_build_index_from_features_in_the_bucket_equals_the_one_from_local_files(ray_local, s3, tmp_path, capsys):
    from clip_platform.data.features import Features, write_features_parquet
    from clip_platform.index import open_index

    query, fs = s3
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    corpus = Features(rng.permutation(10_000)[:600].astype(np.int64), vectors)
    local = tmp_path / "features"
    for part in range(3):
        path = write_features_parquet(local / f"part-{part:05d}-of-00003.parquet",
                                      corpus.slice(200 * part, 200 * part + 200), row_group_rows=50)
        pafs.copy_files(str(path), f"features/index-input/{path.name}", destination_filesystem=fs)
    job = load_job("build_index").main
    job(["--features", str(local), "--output", str(tmp_path / "from-local"), "--rows-per-shard", "100"])
    job(["--features", f"s3://features/index-input?{query}", "--output", str(tmp_path / "from-s3"),
         "--rows-per-shard", "100"])
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["count"] for r in reports] == [600, 600] and reports[0]["factory"] == reports[1]["factory"]
    queries = vectors[::40]
    a, b = open_index(tmp_path / "from-local"), open_index(tmp_path / "from-s3")
    np.testing.assert_array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1])
    assert b.lookup([int(corpus.ids[250])]) == {int(corpus.ids[250]): {
        "file": f"s3://features/index-input/part-00001-of-00003.parquet?{query}", "row": 50}}


@pytest.mark.slow
def test_finetune_reads_shards_from_the_bucket_and_checkpoints_into_it(ray_local, s3, tmp_path):
    from clip_platform.data import lmdb_io
    from clip_platform.train import TrainConfig, run_finetune
    from helpers import sample_log, synthetic_lmdb, write_tar_shards

    query, fs = s3
    dataset = synthetic_lmdb(tmp_path / "synthetic", num_train=48, num_valid=8)
    with lmdb_io.pair_reader(dataset / "train") as read:
        samples = [(f"{i:09d}", image, text) for i, (_, _, text, image) in enumerate(read(i) for i in range(48))]
    for path in write_tar_shards(tmp_path / "train", samples, per_shard=16):
        pafs.copy_files(str(path), f"features/train/{path.name}", destination_filesystem=fs)
    config = TrainConfig(train_data=f"s3://features/train/{{00000..00002}}.tar?{query}", val_data=None,
                         vision_model="ViT-Tiny", text_model="BERT-Tiny-chinese", batch_size=16, lr=1e-3, wd=0.0,
                         warmup=1, max_steps=3, save_step_frequency=2, logs=str(tmp_path / "logs"), name="run",
                         num_workers=1, cpus_per_worker=0.5, max_failures=0, backend="ddp", precision="fp32",
                         record_sample_ids=True, storage_path=f"s3://features/ray-results?{query}")
    result = run_finetune(config)
    assert len(sample_log(result.run_dir)) == 3
    assert result.ray_checkpoint.startswith("features/ray-results/run/")
    stored = [info.path for info in fs.get_file_info(pafs.FileSelector("features/ray-results/run", recursive=True))
              if info.type == pafs.FileType.File]
    assert any(path.startswith(result.ray_checkpoint + "/") for path in stored), stored
    assert clip_models.load(str(result.checkpoint))[0] is not None


def test_knn_and_evaluate_read_and_write_the_bucket(ray_local, s3, tmp_path):
    from clip_platform.data.features import Features, write_features_parquet
    from clip_platform.io import read_file

    query, fs = s3
    rng = np.random.default_rng(7)
    images = Features(np.arange(100, 140, dtype=np.int64), rng.standard_normal((40, 8)).astype(np.float32))
    texts = Features(np.arange(20, dtype=np.int64), rng.standard_normal((20, 8)).astype(np.float32))
    for name, features in (("images", images), ("texts", texts)):
        path = write_features_parquet(tmp_path / f"{name}.parquet", features, row_group_rows=16)
        pafs.copy_files(str(path), f"features/knn/{name}.parquet", destination_filesystem=fs)
    truth = tmp_path / "test_texts.jsonl"
    truth.write_text("".join(json.dumps({"text_id": i, "text": "x", "image_ids": [100 + i]}) + "\n" for i in range(20)))
    knn, evaluate = load_job("knn").main, load_job("evaluate").main
    bucket = lambda name: f"s3://features/knn/{name}?{query}"  # noqa: E731
    knn(["--image-feats", bucket("images.parquet"), "--text-feats", bucket("texts.parquet"),
         "--output", bucket("predictions.jsonl"), "--corpus-shard-size", "16"])
    knn(["--image-feats", str(tmp_path / "images.parquet"), "--text-feats", str(tmp_path / "texts.parquet"),
         "--output", str(tmp_path / "predictions.jsonl")])
    assert read_file(bucket("predictions.jsonl")) == (tmp_path / "predictions.jsonl").read_bytes()
    evaluate([str(truth), bucket("predictions.jsonl"), bucket("recall.json")])
    evaluate([str(truth), str(tmp_path / "predictions.jsonl"), str(tmp_path / "recall.json")])
    assert read_file(bucket("recall.json")) == (tmp_path / "recall.json").read_bytes()
    assert json.loads(read_file(bucket("recall.json")))["success"] is True
