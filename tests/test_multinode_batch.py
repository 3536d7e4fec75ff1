"""The batch jobs on a multi-node cluster (ray.cluster_utils.Cluster: a 1-CPU head and
three 2-CPU nodes, on this machine): the embed pipeline and exact KNN spread their work
over several nodes, and a node removed mid-job costs retries, not records: the output
has every good record exactly once. The node goes when the driver has seen work from
it (a hook in the driver's loop), so there is always work left to lose."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import clip_models
from clip_platform.batch.embed import pipeline as pipeline_module
from clip_platform.batch import knn as knn_module
from clip_platform.batch.embed import EmbedConfig, embed
from clip_platform.data.features import Features, read_features, write_features_parquet
from clip_platform.batch.knn import KnnConfig, knn_search
from conftest import TINY_VIT

pytestmark = pytest.mark.slow


def worker_node(cluster, node_id: str):
    """The cluster's node with this id, if it is a worker node (the head holds the driver)."""
    return next((node for node in cluster.worker_nodes if node.node_id == node_id), None)


def remove_node(cluster, node_id: str) -> None:
    cluster.remove_node(worker_node(cluster, node_id), allow_graceful=False)  # as a crash: no draining


# ---------------------------------------------------------------- embed

def jpeg(rng: np.random.Generator, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_embed_spreads_over_nodes_and_survives_losing_one(ray_cluster, tmp_path, monkeypatch):
    import ray.data

    torch.manual_seed(0)
    model = clip_models.create_model(TINY_VIT).eval()
    checkpoint = clip_models.save_checkpoint(model, tmp_path / "tiny.pt")
    rng = np.random.default_rng(0)
    good = {image_id: jpeg(rng) for image_id in range(240)}
    lines = [f"{i}\t{base64.b64encode(data).decode()}" for i, data in good.items()]
    lines[50:50] = ["1000\t@@@not base64@@@"]
    lines[170:170] = ["no tab on this line"]
    (tmp_path / "corpus_imgs.tsv").write_text("\n".join(lines) + "\n")

    removed, seen = [], []  # seen: (node ids of a batch, after the removal?)
    rows = pipeline_module.Progress.rows

    def rows_then_remove_a_node(self, batch):
        seen.append((set(np.asarray(batch["node"]).astype(str).tolist()), bool(removed)))
        so_far = set().union(*(nodes for nodes, _ in seen))
        workers = [n for n in so_far if worker_node(ray_cluster, n)]
        if not removed and len(so_far) >= 2 and workers:  # work spread: now lose a node that did some
            remove_node(ray_cluster, workers[0])
            removed.append(workers[0])
        rows(self, batch)

    monkeypatch.setattr(pipeline_module.Progress, "rows", rows_then_remove_a_node)
    # Every encoder actor up before data flows: work reaches all of them, not the first one ready.
    # Few read/decode tasks at a time: each is a process importing torch, on 2 cores.
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "wait_for_min_actors_s", 120)
    monkeypatch.setattr(context.execution_options, "resource_limits",
                        context.execution_options.resource_limits.copy(cpu=3.0))
    [report] = embed(EmbedConfig(extract_image_feats=True, image_data=str(tmp_path / "corpus_imgs.tsv"),
                                 resume=str(checkpoint), output_dir=str(tmp_path / "out"), rows_per_shard=20,
                                 img_batch_size=4))

    assert removed, "no node was removed"
    before = set().union(*(nodes for nodes, after in seen if not after))
    assert len(before) >= 2 and removed[0] in before  # spread, and the lost node had done work
    assert any(after for _, after in seen)  # the job went on after the loss
    assert report.num_nodes >= 2
    assert report.num_features == 240 and report.num_skipped == 2
    features = read_features(tmp_path / "out" / "images")
    assert sorted(features.ids.tolist()) == list(range(240))  # every good record, once
    preprocess = clip_models.image_transform(model.image_size)
    sample = [0, 77, 239]
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(good[i]))) for i in sample]))
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()
    got = features.vectors[[features.ids.tolist().index(i) for i in sample]]
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- exact KNN

def test_exact_knn_spreads_over_nodes_and_survives_losing_one(ray_cluster, tmp_path, monkeypatch):
    import ray

    rng = np.random.default_rng(0)
    corpus = Features(np.arange(4000, dtype=np.int64) * 3, rng.standard_normal((4000, 64), dtype=np.float32))
    queries = Features(np.arange(600, dtype=np.int64), rng.standard_normal((600, 64), dtype=np.float32))
    for i, start in enumerate(range(0, 4000, 500)):
        write_features_parquet(tmp_path / "images" / f"part-{i:05d}.parquet", corpus.slice(start, start + 500))
    write_features_parquet(tmp_path / "texts.parquet", queries)

    loaded, removed, seen = [], [], []  # seen: (node ids of a block, after the removal?)
    load_corpus, in_order = knn_module.load_corpus, knn_module.in_order

    def keep_corpus(*args, **kwargs):
        loaded.append(load_corpus(*args, **kwargs))
        return loaded[-1]

    def in_order_then_remove_a_node(blocks, submit, window):
        for block, result in in_order(blocks, submit, window):
            seen.append((set(result[2]), bool(removed)))
            if not removed and len(seen) == 4:
                # The worker node holding the most corpus shards: their tasks and objects are lost.
                locations = ray.experimental.get_object_locations(loaded[0].shards)
                holders = [n for refs in locations.values() for n in refs["node_ids"] if worker_node(ray_cluster, n)]
                victim = max(set(holders), key=holders.count)
                remove_node(ray_cluster, victim)
                removed.append(victim)
            yield block, result

    monkeypatch.setattr(knn_module, "load_corpus", keep_corpus)
    monkeypatch.setattr(knn_module, "in_order", in_order_then_remove_a_node)
    config = KnnConfig(str(tmp_path / "images"), str(tmp_path / "texts.parquet"), str(tmp_path / "pred.jsonl"),
                       query_block_size=20, corpus_shard_size=500, max_inflight_blocks=4)
    report = knn_search(config)

    assert removed, "no node was removed"
    before = set().union(*(nodes for nodes, after in seen if not after))
    assert len(before) >= 2 and report.num_nodes >= 2
    assert any(after for _, after in seen)
    lines = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [line["text_id"] for line in lines] == queries.ids.tolist()  # every query once, in order
    scores = queries.vectors @ corpus.vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert [line["image_ids"] for line in lines] == corpus.ids[top].tolist()
