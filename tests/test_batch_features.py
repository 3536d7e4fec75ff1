"""Feature files (cn_clip JSONL, Parquet shards) and exact top-k math: no Ray."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clip_platform.data.features import (Features, features_table, iter_feature_blocks, plan_shards,
                                          read_feature_file, read_features, write_features_parquet)
from clip_platform.index.topk import chunk_topk, exact_topk, merge_topk
from helpers import write_features_jsonl


def random_features(n: int, dim: int = 8, seed: int = 0, first_id: int = 0) -> Features:
    rng = np.random.default_rng(seed)
    return Features(np.arange(first_id, first_id + n, dtype=np.int64), rng.standard_normal((n, dim), dtype=np.float32))


def tied_features(n: int, dim: int = 4, seed: int = 0) -> Features:
    """Quarter-integer vectors: their dot products are exact in float32, so equal
    scores are truly equal and ties are everywhere. Ids are shuffled."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, (n, dim)).astype(np.float32) / 4
    return Features(rng.permutation(10 * n)[:n].astype(np.int64), vectors)


def brute_force(queries: np.ndarray, corpus: Features, k: int) -> np.ndarray:
    """The definition: sort every candidate by (score descending, id ascending)."""
    scores = queries.astype(np.float64) @ corpus.vectors.astype(np.float64).T
    return np.array([[corpus.ids[j] for j in sorted(range(len(corpus)), key=lambda j: (-row[j], corpus.ids[j]))[:k]]
                     for row in scores])


# ---------------------------------------------------------------- I/O

def test_jsonl_round_trip_is_exact_and_in_cn_clip_format(tmp_path):
    features = random_features(5)
    path = write_features_jsonl(tmp_path / "img.jsonl", features, "image_id")
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["image_id", "feature"] and first["image_id"] == 0
    back = read_feature_file(path, "image_id")
    np.testing.assert_array_equal(back.ids, features.ids)
    np.testing.assert_array_equal(back.vectors, features.vectors)


def test_parquet_shards_have_the_fixed_size_list_layout_and_plan_by_row_group(tmp_path):
    for i in range(3):
        write_features_parquet(tmp_path / f"part-{i}.parquet", random_features(10, first_id=10 * i, seed=i),
                               row_group_rows=4)
    schema = pq.read_schema(tmp_path / "part-0.parquet")
    assert schema.field("id").type == pa.int64() and schema.field("feature").type == pa.list_(pa.float32(), 8)
    whole = read_features(tmp_path)
    assert whole.ids.tolist() == list(range(30)) and whole.dim == 8
    shards = plan_shards(tmp_path, max_rows=8)
    assert [s.num_rows for s in shards] == [8, 2] * 3  # row groups of 4, 4, 2 per file, never split
    np.testing.assert_array_equal(np.concatenate([s.read().vectors for s in shards]), whole.vectors)
    blocks = list(iter_feature_blocks(tmp_path, 7))
    assert [len(b) for b in blocks] == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(Features.concat(blocks).vectors, whole.vectors)


def test_parquet_written_by_others_with_variable_lists_is_read(tmp_path):
    table = pa.table({"id": [3, 4], "feature": [[1.0, 2.0], [3.0, 4.0]]})  # list<double>, not fixed-size
    pq.write_table(table, tmp_path / "x.parquet")
    features = read_feature_file(tmp_path / "x.parquet")
    assert features.vectors.dtype == np.float32 and features.vectors.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("lines, message", [
    (['{"image_id": 1, "feature": [1, 2]}', '{"image_id": 2, "feature": [1, 2'], "line 2: cannot parse as JSON"),
    (['{"image_id": 1, "feature": [1, 2]}', '{"image_id": 2, "feature": [1]}'], "line 2: feature has 1 values"),
    (['{"image_id": 1, "feature": [1, 2]}', '{"image_id": "2", "feature": [1, 2]}'], "line 2: image_id must be an"),
    (['{"image_id": 1, "feature": [1, 2]}', '', '{"image_id": 2}'], "line 3: 'feature' must be"),
    (['{"image_id": 1, "feature": [1, "a"]}'], "line 1: 'feature' holds a value that is not a number"),
    (['{"text_id": 1, "feature": [1, 2]}'], "'text_id' where 'image_id' was expected"),
    (['{"image_id": 1, "feature": [1, NaN]}'], "NaN or infinite"),
    (['{"image_id": 1, "feature": [1, 2]}', '{"image_id": 1, "feature": [1, 2]}'], "id 1 appears 2 times"),
])
def test_malformed_jsonl_features_name_the_problem(tmp_path, lines, message):
    path = tmp_path / "img.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_feature_file(path, "image_id")


def test_bad_parquet_and_missing_paths_are_user_errors(tmp_path):
    pq.write_table(pa.table({"key": [1], "feature": [[1.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="columns 'id' and 'feature'"):
        read_feature_file(tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet"):
        plan_shards(tmp_path / "junk.parquet", 10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_features(tmp_path / "absent.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        read_features(tmp_path / "empty")


def test_features_table_is_what_ray_data_writers_can_take():
    table = features_table(random_features(3, dim=4))
    assert table.num_rows == 3 and table.schema.field("feature").type == pa.list_(pa.float32(), 4)


# ---------------------------------------------------------------- exact top-k

@pytest.mark.parametrize("chunk_rows, max_bytes", [(7, 4 * 5 * 7), (64, 2**20), (10_000, 2**26)])
def test_exact_topk_equals_brute_force_with_ties_broken_by_id(chunk_rows, max_bytes):
    corpus, queries = tied_features(300), tied_features(40, seed=1).vectors
    scores, ids = exact_topk(queries, corpus.vectors, corpus.ids, 10, chunk_rows, max_bytes)
    np.testing.assert_array_equal(ids, brute_force(queries, corpus, 10))
    assert (np.diff(scores, axis=1) <= 0).all()


def test_chunk_topk_resolves_ties_beyond_k_plus_one():
    # Every column ties: torch.topk may return any 3; the smallest ids must win.
    scores = torch.zeros(2, 50)
    ids = np.arange(50)[::-1].copy()
    _, top = chunk_topk(scores, ids, 3)
    assert top.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_merged_shard_results_equal_the_whole(tmp_path):
    corpus, queries = tied_features(200, seed=2), tied_features(30, seed=3).vectors
    parts = [exact_topk(queries, corpus.vectors[s:s + 45], corpus.ids[s:s + 45], 10) for s in range(0, 200, 45)]
    np.testing.assert_array_equal(merge_topk(parts, 10)[1], brute_force(queries, corpus, 10))


def test_k_larger_than_the_corpus_returns_everything():
    corpus = tied_features(4)
    scores, ids = exact_topk(tied_features(2, seed=5).vectors, corpus.vectors, corpus.ids, 10)
    assert ids.shape == (2, 4)
    np.testing.assert_array_equal(ids, brute_force(tied_features(2, seed=5).vectors, corpus, 10))


def test_exact_searcher_over_streamed_shards_equals_one_brute_force_pass(tmp_path):
    from clip_platform.index import ExactSearcher
    from clip_platform.index.searcher import fan_out

    corpus = tied_features(300, seed=3)
    path = write_features_parquet(tmp_path / "corpus.parquet", corpus, row_group_rows=64)
    shards = plan_shards(path, 64)
    assert len(shards) == 5
    queries = tied_features(7, seed=4).vectors
    searcher = ExactSearcher(shards, dim=4, chunk_rows=50)
    assert searcher.ntotal == 300
    _, ids = searcher.search(queries, 12)
    np.testing.assert_array_equal(ids, brute_force(queries, corpus, 12))
    # One searcher per shard, fanned out and merged: the same ids.
    _, fanned = fan_out([ExactSearcher([shard], dim=4) for shard in shards], queries, 12)
    np.testing.assert_array_equal(fanned, ids)
    found, vectors = searcher.vectors([corpus.ids[5], -7, corpus.ids[299]])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(vectors[[0, 2]], corpus.vectors[[5, 299]])
    with pytest.raises(ValueError, match="4-dimensional"):
        searcher.search(np.zeros((1, 3), np.float32), 1)
