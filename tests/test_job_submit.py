"""The README's cluster command, for real: `ray start --head` (Ray 2.60 turns token
authentication on), then `RAY_AUTH_MODE=token ray job submit --working-dir . -- python
jobs/finetune.py --config configs/demo.yaml`. The demo recipe brings its own synthetic data,
since the job runs in an uploaded copy of the code. The head gets its own temp dir and ports,
so the tests' local Ray never sees it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

import clip_models

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(*args, env, timeout, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture
def head():
    """A `ray start --head --block` of its own, stopped by signalling its process group."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # ray.init() in this process sets RAY_AUTH_MODE=token
        env.pop(name, None)
    dashboard, metrics = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")  # short: Ray's unix sockets live under it
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp_dir,
         "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(metrics),
         "--object-store-memory", str(256 * 2**20)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    env = {**env, "RAY_ADDRESS": address, "METRICS_URL": f"http://127.0.0.1:{metrics}/metrics"}
    try:
        deadline = time.time() + 120
        while ray_cli("job", "list", env={**env, "RAY_AUTH_MODE": "token"}, timeout=60).returncode != 0:
            assert process.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(2)
        yield env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_ray_job_submit_finetunes_the_demo_recipe(head, tmp_path):
    logs = tmp_path / "logs"
    command = ["--working-dir", ".", "--", "python", "jobs/finetune.py", "--config", "configs/demo.yaml",
               "--max-steps", "4", "--logs", str(logs), "--name", "submitted"]

    refused = ray_cli("job", "submit", "--no-wait", *command, env=head, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    seen, stop = {}, threading.Event()

    def scrape() -> None:  # the job's metrics on the node's metrics export port, while it runs
        while not stop.is_set():
            try:
                text = requests.get(head["METRICS_URL"], timeout=5).text
            except requests.RequestException:
                text = ""
            for name in ("ray_clip_train_loss", "ray_clip_train_samples_per_s", "ray_clip_train_valid_mean_recall"):
                line = next((row for row in text.splitlines() if row.startswith(name + "{")), None)
                seen[name] = line or seen.get(name)
            stop.wait(1)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    done = ray_cli("job", "submit", *command, env={**head, "RAY_AUTH_MODE": "token"}, timeout=540)
    time.sleep(3)  # the agent's last export
    stop.set()
    scraper.join(timeout=30)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(seen.values()) and 'run="submitted"' in seen["ray_clip_train_loss"], seen
    assert "succeeded" in done.stdout + done.stderr
    checkpoint = logs / "submitted" / "checkpoints" / "epoch_latest.pt"
    assert f"checkpoint: {checkpoint}" in done.stdout
    model, _ = clip_models.load(str(checkpoint))
    assert model.config == clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese").config

    # The dashboard's Train view, through its HTTP API with the cluster's token: the run is listed.
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    runs = requests.get(f"{head['RAY_ADDRESS']}/api/train/v2/runs/v1", headers={"Authorization": f"Bearer {token}"},
                        timeout=30)
    assert runs.status_code == 200, runs.text[:500]
    assert "submitted" in runs.text, runs.text[:2000]


def test_a_submitted_embed_job_shows_its_pipeline_and_its_progress(head, tmp_path):
    from clip_platform.data import SyntheticConfig, make_synthetic

    make_synthetic(SyntheticConfig(str(tmp_path / "data"), num_train=1, num_valid=12, num_test=0, resolution=32,
                                   zeroshot_per_class=0))
    checkpoint = clip_models.save_checkpoint(clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese"), tmp_path / "t.pt")
    command = ["--working-dir", ".", "--", "python", "jobs/embed.py", "--extract-image-feats", "--image-data",
               str(tmp_path / "data" / "valid_imgs.tsv"), "--resume", str(checkpoint), "--output-dir",
               str(tmp_path / "features"), "--rows-per-shard", "4"]
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    done = ray_cli("job", "submit", *command, env={**head, "RAY_AUTH_MODE": "token"}, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The node keeps exporting the driver's last values for a while after it ends.
    text = requests.get(head["METRICS_URL"], timeout=10).text
    rows = [row for row in text.splitlines() if row.startswith("ray_clip_embed_rows_done{")]
    assert rows and 'modality="images"' in rows[0] and rows[0].endswith(" 12.0"), rows or text[-2000:]

    jobs = requests.get(f"{head['RAY_ADDRESS']}/api/jobs/", headers=auth, timeout=30).json()
    [job] = [j for j in jobs if "jobs/embed.py" in j["entrypoint"]]
    datasets = requests.get(f"{head['RAY_ADDRESS']}/api/data/datasets/{job['job_id']}", headers=auth, timeout=30)
    assert datasets.status_code == 200, datasets.text[:500]
    operators = [op["name"] for dataset in datasets.json()["datasets"] for op in dataset["operators"]]
    assert "MapBatches(EmbedActor)" in operators and any(name.startswith("Read") for name in operators), operators
