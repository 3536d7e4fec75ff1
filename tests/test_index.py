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
from clip_platform.index.faiss_index import choose_served_index, served_bytes
from clip_platform.data.features import Features, features_table, write_features_parquet
from clip_platform.index.recall import recall_at_k
from clip_platform.index.topk import exact_topk
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


def test_metadata_runs_merge_sorted_and_are_looked_up_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "GROUP_ROWS", 7)
    monkeypatch.setattr(metadata, "MERGE_BATCH_ROWS", 5)
    rng = np.random.default_rng(1)
    ids = rng.permutation(1000)[:60].astype(np.int64)
    runs = []
    for source, part in enumerate(np.array_split(np.arange(60), 3)):
        runs.append(tmp_path / f"{source}.parquet")
        paths = [f"key{i}" for i in ids[part]] if source == 1 else None
        metadata.write_id_run(runs[-1], ids[part], source, 100, paths)
    assert metadata.merge_id_runs(runs, [0, 1000, 2000], ["a", "b", "c"], tmp_path) == 60
    files = metadata.table_files(0)
    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / files["table"])))
    table = reader.read_all()
    assert table.column("id").to_pylist() == sorted(ids.tolist()) == np.load(tmp_path / files["ids"]).tolist()
    assert reader.num_record_batches == 9
    ids_table = metadata.Metadata(tmp_path)
    found = ids_table.lookup([ids[0], ids[25], -5])
    assert found == {ids[0]: {"file": "a", "row": 100, "path": None},
                     ids[25]: {"file": "b", "row": 100 + 25 - 20, "path": f"key{ids[25]}"}}
    assert ids_table.positions(ids_table.ranks([ids[25]])).tolist() == [1000 + 100 + 5]  # the run's offset + row

    # the next generation: the table as a run again, without two ids, with a new run (positions go on)
    metadata.write_id_run(tmp_path / "3.parquet", np.array([5000, 5001]), 3, 0, None)
    dropped = ids[[3, 40]]
    assert metadata.merge_id_runs([tmp_path / files["table"], tmp_path / "3.parquet"], [None, 3000],
                                  ["a", "b", "c", "d"], tmp_path, 1, dropped) == 60
    second = metadata.Metadata(tmp_path, metadata.table_files(1))
    assert (second.ranks(dropped) == -1).all() and second.lookup([5001]) == {5001: {"file": "d", "row": 1,
                                                                                  "path": None}}
    assert second.positions(second.ranks([ids[25], 5001])).tolist() == [1105, 3001]
    with pytest.raises(ValueError, match=r"id \d+ appears twice in the features: a row \d+ and a row"):
        metadata.merge_id_runs([tmp_path / files["table"], runs[0]], [None, 0], ["a", "b", "c"], tmp_path, 2)


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


def test_pq_codes_are_re_ranked_from_the_stored_vectors_to_the_recall_target(ray_local, tmp_path):
    corpus = clustered(3000, seed=9)
    write_shards(tmp_path / "features", corpus, 2, row_group_rows=500)
    config = IndexConfig(str(tmp_path / "features"), str(tmp_path / "index"), index="IVF16,PQ4x8",
                         recall_target=0.95, tune_queries=200)
    report = build_index(config)
    assert report.search_parameters["rerank"] == 8 and report.recall >= 0.95
    index = open_index(config.output)
    found, vectors = index.vectors(np.append(corpus.ids[[0, 2999]], -7))
    assert found.tolist() == [True, True, False]  # an id not in the index is not found
    np.testing.assert_allclose(vectors[:2], corpus.vectors[[0, 2999]], atol=1e-3)  # float16
    queries = corpus.vectors[::30]
    _, ids = index.search(queries, 10)
    assert ids[:, 0].tolist() == corpus.ids[::30].tolist()  # more like this: the item itself first
    assert recall_at_k(ids, exact_topk(queries, corpus.vectors, corpus.ids, 10)[1]) >= 0.9


def test_add_and_remove_change_the_index_the_metadata_and_the_manifest(ray_local, tmp_path, capsys):
    corpus = clustered(900, seed=10)
    first, more = corpus.slice(0, 600), corpus.slice(600, 900)
    write_shards(tmp_path / "a", first, 2)
    write_shards(tmp_path / "b", more, 1)
    # One checkpoint, spelled relative in one embed run and absolute in the other: the same model.
    weights = [["epoch_latest.pt", 1234, "5f0e"]]
    for folder, source in (("a", "ckpt/epoch_latest.pt"), ("b", "/runs/ckpt/epoch_latest.pt")):
        model = {"source": source, "name": "ViT-Tiny@BERT-Tiny-chinese", "files": weights}
        (tmp_path / folder / "_plan.json").write_text(json.dumps({"settings": {"model": model}}))
    job = load_job("build_index").main
    output = str(tmp_path / "index")
    job(["--features", str(tmp_path / "a"), "--output", output, "--rows-per-shard", "150"])
    write_shards(tmp_path / "other", clustered(10, seed=12), 1)
    other = {"source": "ckpt/epoch_latest.pt", "name": "ViT-Tiny@BERT-Tiny-chinese",
             "files": [["epoch_latest.pt", 1234, "a1b2"]]}  # finetuned further: same size, other weights
    (tmp_path / "other" / "_plan.json").write_text(json.dumps({"settings": {"model": other}}))
    with pytest.raises(ValueError, match="one index, one model"):
        job(["--output", output, "--add", "--features", str(tmp_path / "other")])
    job(["--output", output, "--add", "--features", str(tmp_path / "b")])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["added"], report["count"], report["num_shards"]) == (300, 900, 2)
    index = open_index(output)
    queries = clustered(40, seed=11).vectors
    np.testing.assert_array_equal(index.search(queries, 10)[1],
                                  exact_topk(queries, corpus.vectors, corpus.ids, 10)[1])
    assert index.lookup([corpus.ids[700]]) == {corpus.ids[700]: {"file": str(tmp_path / "b" / "part-00000.parquet"),
                                                                 "row": 100}}
    np.testing.assert_allclose(index.vectors([corpus.ids[700]])[1][0], corpus.vectors[700], atol=1e-3)
    with pytest.raises(ValueError, match="is indexed in .* already"):
        job(["--output", output, "--add", "--features", str(tmp_path / "b")])
    write_shards(tmp_path / "c", corpus.slice(10, 12), 1)  # ids indexed already
    with pytest.raises(ValueError, match=f"id {min(corpus.ids[10:12])} appears twice"):
        job(["--output", output, "--add", "--features", str(tmp_path / "c")])

    gone = corpus.ids[[3, 599, 650, 899]]
    (tmp_path / "takedown.txt").write_text("\n".join(map(str, gone)) + "\n\nnot-an-id\n123456789\n")
    job(["--output", output, "--remove-ids", str(tmp_path / "takedown.txt")])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["removed"], report["not_found"], report["bad_lines"], report["count"]) == (4, 1, 1, 896)
    keep = ~np.isin(corpus.ids, gone)
    index = open_index(output)
    np.testing.assert_array_equal(index.search(queries, 10)[1],
                                  exact_topk(queries, corpus.vectors[keep], corpus.ids[keep], 10)[1])
    assert not index.vectors(gone)[0].any() and index.lookup(gone) == {}
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert [step.get("rows") for step in manifest["history"]] == [300, 4]
    files = {p.name for p in (tmp_path / "index").iterdir()}
    assert "metadata.arrow" not in files and "metadata-00002.arrow" in files  # the old generations went
    write_shards(tmp_path / "d", Features(gone[:1], corpus.vectors[[3]]), 1)
    with pytest.raises(ValueError, match=f"id {gone[0]} was removed from .* before"):
        job(["--output", output, "--add", "--features", str(tmp_path / "d")])
    assert open_index(output).ntotal == 896  # a refused add changed nothing
    assert not (tmp_path / "index" / "metadata-00003.arrow").exists()


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


# ---------------------------------------------------------------- on a 4-node cluster

DRIVER = """
import sys, time
sys.path[:0] = {paths!r}
from clip_platform.index import build
record = build.record_partial
def slow_record(work, shard, result):
    record(work, shard, result)
    time.sleep(0.5)  # a window to be killed in, with partials recorded and more to come
build.record_partial = slow_record
from clip_platform import cli
from helpers import load_job
cli.run(load_job("build_index").main, {argv!r})
"""


@pytest.mark.slow
def test_a_killed_driver_resumes_and_a_lost_node_loses_nothing(ray_cluster, tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_multinode_batch import remove_node, worker_node

    corpus = clustered(2400, seed=12)
    write_shards(tmp_path / "features", corpus, 4)
    output = tmp_path / "index"
    argv = ["--features", str(tmp_path / "features"), "--output", str(output), "--rows-per-shard", "100"]
    paths = [p for p in sys.path if p]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(paths=[os.path.dirname(__file__)] + paths,
                                                                   argv=argv)],
                              env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = output / "_build" / "parts"
    deadline = time.monotonic() + 180
    while len(list(parts.glob("*.json"))) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)  # the driver dies as on a lost head process: no cleanup
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-2000:]
    kept = {int(p.stem) for p in parts.glob("*.json")}
    assert 2 <= len(kept) < 24 and not (output / "manifest.json").exists()

    removed, encoded = [], []
    record = index_build.record_partial

    def record_then_lose_a_node(work, shard, result):
        encoded.append((shard, result["node"]))
        record(work, shard, result)
        workers = [node for _, node in encoded if worker_node(ray_cluster, node)]
        if not removed and workers:  # a node that did work goes, with the tasks it runs
            remove_node(ray_cluster, workers[0])
            removed.append(workers[0])

    monkeypatch.setattr(index_build, "record_partial", record_then_lose_a_node)
    report = build_index(IndexConfig(str(tmp_path / "features"), str(output), rows_per_shard=100))
    assert removed and report.num_nodes >= 2
    assert sorted(shard for shard, _ in encoded) == sorted(set(range(24)) - kept)  # kept partials not redone
    assert report.reused == 24 + len(kept) and report.count == 2400
    index = open_index(output)
    assert sum(shard.ntotal for shard in index.shards) == 2400  # every vector once
    queries = clustered(30, seed=13).vectors
    np.testing.assert_array_equal(index.search(queries, 10)[1], exact_topk(queries, corpus.vectors, corpus.ids, 10)[1])
    found, vectors = index.vectors(corpus.ids)
    assert found.all() and np.abs(vectors - corpus.vectors).max() < 1e-3
