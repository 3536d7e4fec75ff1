"""Multi-node behaviour on one machine: ray.cluster_utils.Cluster with a 1-CPU head and
three 2-CPU nodes. Training workers land on different nodes, and losing a node
mid-run makes the run restore from its last checkpoint and finish."""
from __future__ import annotations

import json
import threading
import time

import pytest

from clip_platform.train import TrainConfig, run_finetune
from helpers import sample_log, synthetic_lmdb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lmdb(tmp_path_factory):
    return synthetic_lmdb(tmp_path_factory.mktemp("synthetic"))


def test_workers_spread_over_nodes_and_survive_losing_one(lmdb, tmp_path, ray_cluster):
    # 1.5 CPUs per worker: no 2-CPU node can hold two, so the two workers sit on two nodes.
    config = TrainConfig(train_data=str(lmdb / "train"), vision_model="ViT-Tiny", text_model="BERT-Tiny-chinese",
                         batch_size=16, max_steps=32, save_step_frequency=2, max_failures=2, workers=2,
                         cpus_per_worker=1.5, num_workers=1, logs=str(tmp_path), name="multi", lr=1e-3,
                         warmup=2, precision="fp32", record_sample_ids=True)
    removed = []

    def remove_the_node_of_rank_1():
        workers, metrics, seen = config.run_dir / "workers.json", config.run_dir / "metrics.jsonl", None
        deadline = time.time() + 300
        while time.time() < deadline and not removed:
            if workers.is_file() and metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                seen = seen or time.time()
                if time.time() - seen > 3:  # let Ray Train register a checkpoint first
                    node_id = json.loads(workers.read_text())[1]["node_id"]
                    node = next(n for n in ray_cluster.worker_nodes if n.node_id == node_id)
                    ray_cluster.remove_node(node)
                    removed.append(node_id)
            time.sleep(0.1)

    thread = threading.Thread(target=remove_the_node_of_rank_1, daemon=True)
    thread.start()
    result = run_finetune(config)
    thread.join(timeout=5)
    assert removed, "no node was removed"
    first_placement = None
    for log_file in sorted(result.run_dir.glob("out_*.log")):
        text = log_file.read_text()
        first_placement = first_placement or text
    assert "2 workers on 2 node(s)" in first_placement
    assert sorted(sample_log(result.run_dir)) == list(range(1, 33))
    log_text = "".join(p.read_text() for p in result.run_dir.glob("out_*.log"))
    assert "=> resumed from checkpoint" in log_text
