"""jobs/knn.py on the shared local Ray: exact search equals brute force (ties
included) across shards and blocks; FAISS reports its recall; bad input is a user error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip_platform import cli
from clip_platform.index.faiss_index import choose_served_index, temporary_factory
from clip_platform.data.features import Features, write_features_parquet
from clip_platform.batch import knn
from clip_platform.batch.knn import KnnConfig, QuerySample, knn_search
from clip_platform.index.recall import recall_at_k
from helpers import load_job, write_features_jsonl
from test_batch_features import brute_force, tied_features



def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """Tie-heavy images as 3 Parquet shards (row groups of 16) and as JSONL; texts as JSONL."""
    root = tmp_path_factory.mktemp("knn")
    images, texts = tied_features(150, seed=10), tied_features(37, seed=11)
    for i, start in enumerate(range(0, 150, 50)):
        write_features_parquet(root / "images" / f"part-{i:05d}.parquet", images.slice(start, start + 50),
                               row_group_rows=16)
    write_features_jsonl(root / "images.jsonl", images, "image_id")
    write_features_jsonl(root / "texts.jsonl", texts, "text_id")
    return root, images, texts


def test_exact_t2i_over_shards_and_blocks_equals_brute_force(ray_local, corpus_files, tmp_path):
    root, images, texts = corpus_files
    config = KnnConfig(str(root / "images"), str(root / "texts.jsonl"), str(tmp_path / "pred.jsonl"),
                       query_block_size=8, corpus_shard_size=40, eval_batch_size=13, max_inflight_blocks=2)
    report = knn_search(config)
    lines = read_lines(config.output)
    assert [line["text_id"] for line in lines] == texts.ids.tolist()  # query order kept
    assert [line["image_ids"] for line in lines] == brute_force(texts.vectors, images, 10).tolist()
    assert (report.num_queries, report.corpus_size, report.k, report.index) == (37, 150, 10, "exact")


def test_exact_i2t_from_cn_clip_jsonl_equals_brute_force(ray_local, corpus_files, tmp_path):
    root, images, texts = corpus_files
    job = load_job("knn")
    out = tmp_path / "pred_tr.jsonl"
    job.main(["--image-feats", str(root / "images.jsonl"), "--text-feats", str(root / "texts.jsonl"),
              "--output", str(out), "--mode", "i2t", "--top-k", "5", "--query-block-size", "64"])
    lines = read_lines(out)
    assert list(lines[0]) == ["image_id", "text_ids"]
    assert [line["image_id"] for line in lines] == images.ids.tolist()
    assert [line["text_ids"] for line in lines] == brute_force(images.vectors, texts, 5).tolist()


def test_top_k_beyond_the_corpus_predicts_what_exists(ray_local, corpus_files, tmp_path):
    root, images, texts = corpus_files
    report = knn_search(KnnConfig(str(root / "images.jsonl"), str(root / "texts.jsonl"), str(tmp_path / "p.jsonl"),
                                  mode="i2t", top_k=50))
    assert report.k == 37 and all(len(line["text_ids"]) == 37 for line in read_lines(tmp_path / "p.jsonl"))


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors near a 4-d manifold of 50 clusters: neighbourhoods an index can find, like real embeddings."""
    rng = np.random.default_rng(seed)
    lift = np.random.default_rng(99).standard_normal((4, dim), dtype=np.float32)
    centers = np.random.default_rng(98).standard_normal((50, 4), dtype=np.float32)
    z = centers[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, 4), dtype=np.float32)
    x = z @ lift + 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "flat", "IVF8,PQ4x4fs"])
def test_faiss_writes_predictions_and_reports_recall_against_exact(ray_local, tmp_path, monkeypatch, kind):
    # The corpus is streamed (into the build, then past the recall sample), never loaded whole.
    monkeypatch.setattr(knn, "load_corpus", lambda *args: pytest.fail("--index faiss loaded the corpus"))
    write_features_parquet(tmp_path / "img.parquet", Features(np.arange(3000, dtype=np.int64), clustered(3000)))
    write_features_parquet(tmp_path / "txt.parquet", Features(np.arange(50, dtype=np.int64), clustered(50, seed=1)))
    report = knn_search(KnnConfig(str(tmp_path / "img.parquet"), str(tmp_path / "txt.parquet"),
                                  str(tmp_path / "pred.jsonl"), index="faiss", faiss_index=kind, recall_sample=20))
    lines = read_lines(tmp_path / "pred.jsonl")
    assert len(lines) == 50 and all(len(set(line["image_ids"])) == 10 for line in lines)
    assert report.index.startswith("faiss") and report.recall_queries == 20
    assert report.recall == 1.0 if kind == "flat" else 0.8 <= report.recall <= 1.0


def test_a_temporary_index_is_chosen_to_build_fast():
    assert choose_served_index(1_000_000, 512, 1 << 40, "fast")[0].factory == "IVF128,PQ64x4fs"
    assert temporary_factory(10_000, 512) == "HNSW32,Flat"
    assert temporary_factory(1_000_000, 512) == "IVF128,PQ64x4fs"  # few lists, 4-bit fast-scan codes
    assert temporary_factory(60_000, 6) == "IVF32,Flat"  # no PQ grouping of 6 dimensions


def test_query_sample_is_uniform_and_bounded():
    sample = QuerySample(10, seed=0)
    for start in range(0, 1000, 100):
        ids = np.arange(start, start + 100)
        sample.add(Features(ids, np.zeros((100, 2), np.float32)), ids[:, None])
    assert len(sample.queries) == 10 and sample.queries.ids.max() > 500  # later blocks are sampled too
    assert (sample.results[:, 0] == sample.queries.ids).all()
    assert recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 3, 1]])) == 2 / 3


@pytest.mark.parametrize("args, message", [
    (["--image-feats", "{root}/absent.jsonl"], "absent.jsonl does not exist"),
    (["--text-feats", "{root}/images.jsonl"], "'image_id' where 'text_id' was expected"),
    (["--top-k", "0"], "top_k must be at least 1"),
    (["--index", "faiss", "--faiss-index", "NoSuchIndex"], "FAISS cannot build 'IDMap2,NoSuchIndex'"),
    (["--index", "faiss", "--recall-target", "1.5"], "--recall-target must be in (0, 1]"),
])
def test_knn_job_user_errors_are_one_line(ray_local, corpus_files, tmp_path, capsys, args, message):
    root, _, _ = corpus_files
    argv = {"--image-feats": str(root / "images.jsonl"), "--text-feats": str(root / "texts.jsonl"),
            "--output": str(tmp_path / "p.jsonl")}
    argv.update(dict(zip(args[::2], (a.format(root=root) for a in args[1::2]))))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("knn").main, [x for pair in argv.items() for x in pair])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.jsonl").exists()


def test_dimension_mismatch_is_reported(ray_local, corpus_files, tmp_path):
    root, _, _ = corpus_files
    write_features_jsonl(tmp_path / "texts8.jsonl", Features(np.arange(3), np.ones((3, 8), np.float32)), "text_id")
    with pytest.raises(ValueError, match="8 dimensions, the corpus has 4"):
        knn_search(KnnConfig(str(root / "images"), str(tmp_path / "texts8.jsonl"), str(tmp_path / "p.jsonl")))
