"""The embed job on a corpus whose decoded images are 10x the object store of the test
Ray (256 MiB): it must stream, with Ray Data's backpressure keeping the store from
filling and spilling, and the driver holding only features, not images."""
from __future__ import annotations

import base64
import io
import math
import re
import threading
from dataclasses import replace

import numpy as np
import psutil
import pytest
from PIL import Image

import clip_models
from clip_platform.batch.embed import EmbedConfig, embed
from clip_platform.data.features import read_features
from conftest import TINY_VIT

pytestmark = pytest.mark.slow

IMAGE_SIZE = 448  # large inputs, few rows: 602 KiB of float32-free uint8 pixels each after decoding


def spilled_mib(ray) -> int:
    from ray._private.internal_api import memory_summary

    # its own GCS address: another Ray on the machine (a demo, a benchmark) must not confuse it
    found = re.search(r"Spilled (\d+) MiB", memory_summary(address=ray.get_runtime_context().gcs_address,
                                                             stats_only=True))
    return int(found.group(1)) if found else 0


class PeakRss:
    """Peak resident memory of this process (the driver), sampled in a thread."""

    def __init__(self):
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def test_embeds_a_corpus_ten_times_the_object_store_with_bounded_memory(ray_local, tmp_path):
    config = clip_models.config_from_struct(TINY_VIT)
    config = replace(config, vision=replace(config.vision, image_size=IMAGE_SIZE, patch_size=64))
    checkpoint = clip_models.save_checkpoint(clip_models.CLIP(config).eval(), tmp_path / "tiny448.pt")

    store_bytes = ray_local.cluster_resources()["object_store_memory"]
    decoded_bytes = 3 * IMAGE_SIZE * IMAGE_SIZE  # uint8 pixels, as they travel from decode to encoder
    num_images = math.ceil(10 * store_bytes / decoded_bytes)
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(8):  # a few distinct small JPEGs, repeated: the decoded size is what counts
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, format="JPEG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    with open(tmp_path / "big_imgs.tsv", "w") as out:
        out.writelines(f"{i}\t{encoded[i % 8]}\n" for i in range(num_images))

    spilled_before = spilled_mib(ray_local)
    with PeakRss() as rss:
        [report] = embed(EmbedConfig(extract_image_feats=True, image_data=str(tmp_path / "big_imgs.tsv"),
                                     resume=str(checkpoint), output_dir=str(tmp_path / "out"), rows_per_shard=1000,
                                     img_batch_size=16))
    spilled = spilled_mib(ray_local) - spilled_before

    assert report.num_features == num_images and report.num_skipped == 0
    assert sorted(read_features(tmp_path / "out" / "images").ids.tolist()) == list(range(num_images))
    decoded_mib = num_images * decoded_bytes / 2**20
    assert decoded_mib >= 10 * store_bytes / 2**20
    assert spilled < decoded_mib / 10, f"{spilled} MiB spilled of {decoded_mib:.0f} MiB decoded"
    grown_mib = (rss.peak - rss.start) / 2**20
    assert grown_mib < 300, f"the driver grew by {grown_mib:.0f} MiB"
    print(f"{num_images} images, {decoded_mib:.0f} MiB decoded through a {store_bytes / 2**20:.0f} MiB store: "
          f"{spilled} MiB spilled, driver +{grown_mib:.0f} MiB, {report.seconds:.0f} s")
