"""The persistent index (clip_platform.index, jobs/build_index.py) on tiny data: a flat index
is exact, an IVF index meets its recall target over index shards, an interrupted build
keeps its finished partials, duplicate ids and bad paths are one clear error; the index
choice and the metadata table without Ray."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_platform import cli
from clip_platform.batch.faiss_index import choose_served_index, served_bytes
from clip_platform.batch.features import Features, features_table, write_features_parquet
from clip_platform.batch.knn import recall_at_k
from clip_platform.batch.topk import exact_topk
from clip_platform.index import IndexConfig, open_index
from clip_platform.index import build as index_build
from clip_platform.index import metadata
from clip_platform.index.build import build_index
from helpers import load_job, write_features_jsonl

GB = 2**30


def clustered(n: int, dim: int = 16, seed: int = 0, first_id: int = 0) -> Features:
    """Unit vectors around 40 centres (as embeddings cluster), ids shuffled and sparse."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    vectors = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    return Features(first_id + rng.permutation(5 * n)[:n].astype(np.int64), vectors)


def write_shards(folder, features: Features, num_files: int, row_group_rows: int = 100) -> None:
    for i, part in enumerate(np.array_split(np.arange(len(features)), num_files)):
        write_features_parquet(folder / f"part-{i:05d}.parquet", features.slice(part[0], part[-1] + 1), row_group_rows)


# ---------------------------------------------------------------- choosing (no Ray)

def test_the_index_follows_the_corpus_size_and_the_memory_budget():
    assert choose_served_index(5000, 512, 4 * GB) == (choose_served_index(5000, 512, 4 * GB, "flat")[0], 1)
    assert choose_served_index(5000, 512, 4 * GB)[0].factory == "IVF1,Flat"  # exact, memory-mapped
    spec, shards = choose_served_index(4_000_000, 512, 4 * GB)
    assert spec.factory == "IVF4096_HNSW32,SQ8" and shards == 1  # float32 would take 8 GB
    spec, shards = choose_served_index(4_000_000, 512, GB // 2)
    assert spec.factory.endswith("PQ64x8") and served_bytes(spec.factory, 4_000_000, 512) <= GB // 2
    spec, shards = choose_served_index(1_000_000_000, 512, 4 * GB)  # even the smallest codes do not fit
    assert spec.factory.endswith("PQ16x8") and shards == 6
    assert choose_served_index(200_000, 64, 4 * GB, num_shards=3)[1] == 3
    assert choose_served_index(2000, 16, GB, "HNSW16")[0].factory == "IDMap2,HNSW16"  # ids kept by an id map
    with pytest.raises(ValueError, match="unknown FAISS index kind"):
        choose_served_index(2000, 16, GB, "")


def test_metadata_runs_merge_sorted_and_are_looked_up_by_row_group(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "GROUP_ROWS", 7)
    monkeypatch.setattr(metadata, "MERGE_BATCH_ROWS", 5)
    rng = np.random.default_rng(1)
    ids = rng.permutation(1000)[:60].astype(np.int64)
    runs = []
    for source, part in enumerate(np.array_split(np.arange(60), 3)):
        runs.append(tmp_path / f"{source}.parquet")
        paths = [f"key{i}" for i in ids[part]] if source == 1 else None
        metadata.write_id_run(runs[-1], ids[part], source, 100, paths)
    assert metadata.merge_id_runs(runs, ["a", "b", "c"], tmp_path) == 60
    table = pq.read_table(tmp_path / metadata.METADATA_FILE)
    assert table.column("id").to_pylist() == sorted(ids.tolist())
    assert pq.ParquetFile(tmp_path / metadata.METADATA_FILE).metadata.num_row_groups == 9
    found = metadata.Metadata(tmp_path).lookup([ids[0], ids[25], -5])
    assert found == {ids[0]: {"file": "a", "row": 100, "path": None},
                     ids[25]: {"file": "b", "row": 100 + 25 - 20, "path": f"key{ids[25]}"}}


# ---------------------------------------------------------------- builds on the local Ray

def test_flat_index_returns_the_exact_top_k(ray_local, tmp_path):
    corpus = clustered(900, seed=2)
    write_shards(tmp_path / "a", corpus.slice(0, 400), 2)
    model = {"source": "ViT-B-16", "name": "ViT-B-16@RoBERTa-wwm-ext-base-chinese", "files": []}
    (tmp_path / "a" / "_plan.json").write_text(json.dumps({"settings": {"model": model, "precision": "fp32"}}))
    table = features_table(corpus.slice(400, 700))  # the embed job's shards of string-named records
    table = table.append_column("path", pa.array([f"img/{i}.jpg" for i in corpus.ids[400:700]]))
    (tmp_path / "b").mkdir()
    pq.write_table(table, tmp_path / "b" / "part-00000.parquet", row_group_size=64)
    write_features_jsonl(tmp_path / "c.jsonl", corpus.slice(700, 900), "image_id")
    config = IndexConfig((str(tmp_path / "a"), str(tmp_path / "b" / "*.parquet"), str(tmp_path / "c.jsonl")),
                         str(tmp_path / "index"), rows_per_shard=150)
    report = build_index(config)
    assert (report.factory, report.count, report.dim, report.recall) == ("IVF1,Flat", 900, 16, 1.0)

    queries = clustered(50, seed=3).vectors
    scores, ids = open_index(config.output).search(queries, 10)
    exact_scores, exact_ids = exact_topk(queries, corpus.vectors, corpus.ids, 10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)

    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert (manifest["count"], manifest["metric"], manifest["layout"]) == (900, "inner_product", "ondisk")
    assert [s["rows"] for s in manifest["sources"]] == [200, 200, 300, 200]
    assert manifest["sources"][3]["bytes"] == (tmp_path / "c.jsonl").stat().st_size
    assert manifest["model"] == model  # what the embed job recorded beside its shards
    assert not (tmp_path / "index" / "_build").exists()
    found = metadata.Metadata(config.output).lookup(corpus.ids[[0, 450, 899]])
    assert found[corpus.ids[450]] == {"file": str(tmp_path / "b" / "part-00000.parquet"), "row": 50,
                                      "path": f"img/{corpus.ids[450]}.jpg"}
    assert found[corpus.ids[899]]["row"] == 199 and found[corpus.ids[0]]["path"] is None
    assert build_index(config).count == 900  # a finished build is found, not redone


def test_ivf_index_meets_its_recall_target_over_two_index_shards(ray_local, tmp_path):
    corpus = clustered(6000, dim=32, seed=4)
    write_shards(tmp_path / "features", corpus, 3, row_group_rows=500)
    config = IndexConfig(str(tmp_path / "features"), str(tmp_path / "index"), index="ivf", num_shards=2,
                         recall_target=0.9, tune_queries=300, rows_per_shard=1000)
    report = build_index(config)
    assert report.factory.startswith("IVF") and report.num_shards == 2 and report.recall >= 0.9
    assert "nprobe" in report.search_parameters
    index = open_index(config.output)
    assert sum(shard.ntotal for shard in index.shards) == 6000
    queries = corpus.vectors[::40]  # corpus vectors, as the tuning queries are
    _, ids = index.search(queries, 10)
    assert recall_at_k(ids, exact_topk(queries, corpus.vectors, corpus.ids, 10)[1]) >= 0.85


def test_an_interrupted_build_resumes_keeping_its_finished_partials(ray_local, tmp_path, monkeypatch):
    corpus = clustered(1200, seed=5)
    write_shards(tmp_path / "features", corpus, 6)
    config = IndexConfig(str(tmp_path / "features"), str(tmp_path / "index"), rows_per_shard=200)
    record = index_build.record_partial
    recorded = []

    def interrupted(work, shard, result):
        if len(recorded) == 2:
            raise KeyboardInterrupt  # the driver stops after two partials were recorded
        recorded.append(shard)
        record(work, shard, result)

    monkeypatch.setattr(index_build, "record_partial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(config)
    first = list(recorded)
    assert len(first) == 2 and (tmp_path / "index" / "_build" / "parts" / f"{first[0]:05d}.index").is_file()

    recorded.clear()
    monkeypatch.setattr(index_build, "record_partial", lambda work, shard, result: (recorded.append(shard),
                                                                                     record(work, shard, result)))
    report = build_index(config)
    assert sorted(recorded) == sorted(set(range(6)) - set(first))  # only the unfinished partials were encoded
    assert report.reused == 6 + 2 and report.count == 1200  # every scan and the two partials kept
    _, ids = open_index(config.output).search(corpus.vectors[:20], 5)
    np.testing.assert_array_equal(ids, exact_topk(corpus.vectors[:20], corpus.vectors, corpus.ids, 5)[1])


def test_duplicate_ids_are_refused_naming_one(ray_local, tmp_path):
    corpus = clustered(300, seed=6)
    write_shards(tmp_path / "features", corpus, 2)
    again = Features(corpus.ids[[5]], corpus.vectors[[9]])
    write_features_parquet(tmp_path / "features" / "part-00009.parquet", again)
    with pytest.raises(ValueError, match=rf"id {corpus.ids[5]} appears twice in the features: "
                                         rf".*part-00000.parquet row 5 and .*part-00009.parquet row 0"):
        build_index(IndexConfig(str(tmp_path / "features"), str(tmp_path / "index")))


@pytest.mark.parametrize("path, message", [
    ("missing", "feature file or directory {tmp}/missing does not exist"),
    ("shards/*.parquet", "no *.parquet or *.jsonl feature files match {tmp}/shards/*.parquet"),
    ("empty", "feature directory {tmp}/empty holds no *.parquet or *.jsonl files"),
])
def test_a_bad_features_path_is_one_line_and_exit_2(tmp_path, capsys, path, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli.run(load_job("build_index").main, ["--features", str(tmp_path / path), "--output", str(tmp_path / "i")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(f": error: {message.format(tmp=tmp_path)}")


def test_knn_job_searches_a_built_index_with_cn_clip_flags(ray_local, tmp_path):
    images, texts = clustered(500, seed=7), clustered(40, seed=8, first_id=10_000)
    write_shards(tmp_path / "images", images, 2)
    write_features_jsonl(tmp_path / "texts.jsonl", texts, "text_id")
    build_index(IndexConfig(str(tmp_path / "images"), str(tmp_path / "index")))
    out = tmp_path / "predictions.jsonl"
    load_job("knn").main(["--text-feats", str(tmp_path / "texts.jsonl"), "--index", str(tmp_path / "index"),
                          "--output", str(out), "--top-k", "5", "--query-block-size", "16"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["text_id"] for line in lines] == texts.ids.tolist()
    assert [line["image_ids"] for line in lines] == exact_topk(texts.vectors, images.vectors, images.ids, 5)[1].tolist()
    with pytest.raises(ValueError, match="--index must be exact, faiss or the directory of an index"):
        load_job("knn").main(["--text-feats", str(tmp_path / "texts.jsonl"), "--index", str(tmp_path / "nope"),
                              "--output", str(out)])
