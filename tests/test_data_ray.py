"""The data plane through a real local Ray: the training read path (pairs by index, in
plan order), corpus readers of every kind (webdataset included), bad records keeping
their slot, and bounded memory while streaming."""
from __future__ import annotations

import base64
import io
import pickle
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import numpy as np
import torch
from PIL import Image

import clip_models
from clip_platform.data import (BuildLmdbConfig, LmdbSplitWriter, SyntheticConfig, build_lmdb, count_pairs,
                                decode_batch, make_synthetic, open_pairs, read_images, read_labels, read_texts,
                                read_zeroshot, records)
from clip_platform.data import lmdb_io
from clip_platform.train.data import SampleDecoder, stream_batches
from helpers import write_tar_shards

IMAGE_SIZE = 32
CONTEXT = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(SyntheticConfig(str(out), num_train=30, num_valid=10, num_test=0, resolution=32, lmdb=True,
                                   zeroshot_per_class=1))
    return out


def jpeg(colour=(200, 30, 30), size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def plain_loop(split_dir) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """What cn_clip's LMDBDataset computes, record by record, with no platform code."""
    import lmdb

    transform = clip_models.image_transform(IMAGE_SIZE)
    out = {}
    pairs = lmdb.open(str(split_dir / "pairs"), readonly=True, lock=False)
    imgs = lmdb.open(str(split_dir / "imgs"), readonly=True, lock=False)
    with pairs.begin() as txn_pairs, imgs.begin() as txn_imgs:
        for index in range(int(txn_pairs.get(b"num_samples"))):
            image_id, text_id, text = pickle.loads(txn_pairs.get(str(index).encode()))
            data = base64.urlsafe_b64decode(txn_imgs.get(str(image_id).encode()).decode())
            image = transform(Image.open(io.BytesIO(data)))
            tokens = clip_models.tokenize([clip_models.preprocess_text(text)], CONTEXT)[0]
            out[(image_id, text_id)] = (image, tokens)
    pairs.close()
    imgs.close()
    return out


def collect(batches) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for batch in batches:
        assert batch["image"].dtype == np.uint8  # pixels; the model normalises them
        for i in np.flatnonzero(batch["valid"]):
            key = (int(batch["image_id"][i]), int(batch["text_id"][i]))
            assert key not in out, f"{key} read twice"
            out[key] = (clip_models.normalize_pixels(torch.tensor(batch["image"][i])), torch.tensor(batch["tokens"][i]))
    return out


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key, (image, tokens) in expected.items():
        torch.testing.assert_close(got[key][0], image, atol=0, rtol=0)
        assert torch.equal(got[key][1], tokens)


def stream(path, indices, batch_size=8, use_augment=False):
    """The training read path: the data plane's pair source in plan order, decoded."""
    return list(stream_batches(open_pairs(path), SampleDecoder(IMAGE_SIZE, CONTEXT, use_augment),
                               np.asarray(indices), batch_size, 2))


def test_training_stream_yields_the_same_tensors_as_a_plain_loop_in_plan_order(ray_local, dataset):
    split = dataset / "lmdb" / "train"
    expected = plain_loop(split)
    assert len(expected) == count_pairs(split) == 60
    order = np.random.default_rng(0).permutation(60)
    batches = stream(split, order)
    assert np.concatenate([b["index"] for b in batches]).tolist() == order.tolist()  # the plan's order
    assert all(len(b["index"]) == 8 for b in batches[:-1])
    assert_same(collect(batches), expected)


def test_training_augmentation_gives_model_ready_arrays(ray_local, dataset):
    batch = stream(dataset / "lmdb" / "valid", range(10), batch_size=10, use_augment=True)[0]
    assert batch["image"].shape == (10, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (10, CONTEXT) and batch["tokens"].dtype == np.int64


def write_messy_lmdb(split_dir):
    good = base64.b64encode(jpeg()).decode()
    with LmdbSplitWriter(split_dir) as writer:  # writes what it is given: no validation at this level
        writer.add_image(1, good)
        writer.add_image(2, base64.b64encode(jpeg()[:60]).decode())          # truncated JPEG
        writer.add_image(3, base64.b64encode(b"<html>not an image</html>").decode())  # not an image
        writer.add_image(4, "!!!!")                                          # bad base64
        for image_id, text_id in ((1, 10), (2, 11), (3, 12), (4, 13), (77, 14), (1, 15)):  # 77: missing image
            writer.add_pair(image_id, text_id, "文字")
    import lmdb

    env = lmdb.open(str(split_dir / "pairs"))
    with env.begin(write=True) as txn:  # a hostile pickle in place of pair 5
        txn.put(b"5", b"cos\nsystem\n(S'touch /tmp/clip_platform_pwned'\ntR.")
    env.close()


def test_bad_records_keep_their_slot_and_say_why(ray_local, tmp_path):
    write_messy_lmdb(tmp_path / "lmdb" / "train")
    batches = stream(tmp_path / "lmdb" / "train", range(6), batch_size=6)
    (batch,) = batches
    assert batch["valid"].tolist() == [True, False, False, False, False, False]
    errors = [str(e) for e in batch["error"]]
    assert errors[0] == ""
    kinds = [records.BAD_IMAGE, records.BAD_IMAGE, records.BAD_BASE64, records.MISSING_IMAGE, records.BAD_PICKLE]
    for error, kind in zip(errors[1:], kinds):
        assert error.startswith(kind), (error, kind)
    assert "id=77" in errors[4]


def test_webdataset_pairs_are_keyed_samples_with_both_image_and_caption(ray_local, tmp_path):
    samples = [(f"{i:09d}", jpeg((i * 20, 40, 90)), f"第{i}张图") for i in range(7)]
    samples[2] = ("000000002", b"not an image", "坏的")  # corrupt image: a flagged slot
    samples[4] = ("000000004", None, "只有文字")  # caption-only: no pair at all
    write_tar_shards(tmp_path / "shards", samples, per_shard=3)
    pattern = f"file://{tmp_path}/shards/{{00000..00002}}.tar"  # a brace pattern on a filesystem URI
    pairs = open_pairs(pattern)
    assert len(pairs) == 6
    (batch,) = stream(pattern, range(6), batch_size=6)
    assert batch["image_id"].tolist() == batch["text_id"].tolist() == [0, 1, 2, 3, 5, 6]
    assert batch["valid"].tolist() == [True, True, False, True, True, True]
    assert str(batch["error"][2]).startswith(records.BAD_IMAGE)
    expected = clip_models.tokenize([clip_models.preprocess_text("第5张图")], CONTEXT)[0].numpy()
    assert (batch["tokens"][4] == expected).all()


def test_image_corpora_of_every_kind_read_the_same(ray_local, dataset, tmp_path):
    expected = dict(lmdb_io.iter_images(dataset / "lmdb" / "valid" / "imgs", None, None, []))
    pq.write_table(pa.table({"id": list(expected), "image": list(expected.values())}), tmp_path / "part.parquet")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for image_id, data in expected.items():
        (folder / "sub" / f"{image_id}.jpg").write_bytes(data)
    (folder / "notes.txt").write_text("not an image: ignored")
    for path in (dataset / "lmdb" / "valid" / "imgs", dataset / "lmdb" / "valid", dataset / "valid_imgs.tsv",
                 tmp_path / "part.parquet", f"file://{tmp_path}/*.parquet"):
        got = {r["image_id"]: r["image"] for r in read_images(path).take_all()}
        assert got == expected, path
    write_tar_shards(tmp_path / "wds", [(f"{k:06d}", v, "文字") for k, v in expected.items()], per_shard=3)
    from_tars = {r["image_id"]: r["image"] for r in read_images(f"{tmp_path}/wds/*.tar").take_all()}
    assert from_tars == {f"{k:06d}": v for k, v in expected.items()}
    assert {r["text_id"] for r in read_texts(tmp_path / "wds").take_all()} == set(from_tars)
    from_files = {r["image_id"]: r["image"] for r in read_images(folder).take_all()}
    assert from_files == {f"sub/{k}.jpg": v for k, v in expected.items()}
    # Any pyarrow filesystem: here a subtree view of the local one, as an s3:// bucket would be.
    subtree = pafs.SubTreeFileSystem(str(dataset), pafs.LocalFileSystem())
    assert len(read_images("valid_imgs.tsv", filesystem=subtree).take_all()) == 10


def test_texts_zeroshot_and_labels(ray_local, dataset):
    texts = read_texts(dataset / "valid_texts.jsonl").take_all()
    assert len(texts) == 10 and all(len(t["image_ids"]) == 1 and t["text"] for t in texts)
    labels = read_labels(dataset / "zeroshot")
    rows = read_zeroshot(dataset / "zeroshot").take_all()
    assert len(labels) == 24 and labels[0] == "红色的圆形"
    assert sorted(r["label"] for r in rows) == list(range(24))
    assert all(r["image_id"].startswith(f"{r['label']:03d}/") for r in rows)
    transform = clip_models.image_transform(IMAGE_SIZE, pixels=True)
    decoded = read_zeroshot(dataset / "zeroshot" / "test").map_batches(
        lambda batch: decode_batch(batch, transform, CONTEXT)[0], batch_format="numpy").take_batch(24)
    assert decoded["image"].shape == (24, 3, IMAGE_SIZE, IMAGE_SIZE) and decoded["valid"].all()
    assert set(decoded) == {"image", "image_id", "label", "valid"}


def test_a_path_that_is_no_pair_source_is_a_clear_error(dataset):
    with pytest.raises(FileNotFoundError, match="not a cn_clip LMDB split"):
        open_pairs(dataset)
    # A folder that is no zero-shot dataset is named as such (not by a label file beside it).
    with pytest.raises(FileNotFoundError, match=f"^{dataset} is not a zero-shot dataset .*{dataset.parent}/label_cn"):
        read_labels(dataset)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        read_labels(dataset / "nowhere")


def test_build_with_ray_equals_build_in_one_process(ray_local, dataset, tmp_path):
    (local,) = build_lmdb(BuildLmdbConfig(str(dataset), "train", lmdb_dir=str(tmp_path / "local"), parallel="local"))
    (remote,) = build_lmdb(BuildLmdbConfig(str(dataset), "train", lmdb_dir=str(tmp_path / "ray"), parallel="ray"))
    assert (local.num_images, local.num_samples) == (remote.num_images, remote.num_samples) == (30, 60)
    for name in ("pairs", "imgs"):
        with lmdb_io.open_env(tmp_path / "local" / "train" / name) as a, \
                lmdb_io.open_env(tmp_path / "ray" / "train" / name) as b, a.begin() as ta, b.begin() as tb:
            assert list(ta.cursor()) == list(tb.cursor())


@pytest.mark.slow
def test_streams_a_dataset_several_times_the_object_store(ray_local, tmp_path):
    # 4800 decoded 224 px images (uint8) are ~690 MiB, ~3x the 256 MiB object store of the
    # test cluster: backpressure must keep it streaming, not spill it all or crash.
    # Blocks must be small next to the store (Ray's default of 128 MiB is sized for
    # real clusters, whose stores hold many GiB): 16 MiB here.
    import ray.data
    from ray._private.internal_api import memory_summary

    def spilled_mib() -> int:
        # the address: another Ray on the same machine (a demo, a benchmark) must not confuse it
        found = re.search(r"Spilled (\d+) MiB",
                          memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True))
        return int(found.group(1)) if found else 0

    image_size, num_images, batch_size = 224, 4800, 64
    small = base64.b64encode(jpeg(size=16)).decode()
    with LmdbSplitWriter(tmp_path / "big") as writer:
        for image_id in range(num_images):
            writer.add_image(image_id, small)
            writer.add_pair(image_id, image_id, "一个红色的圆形")
    context = ray.data.DataContext.get_current()
    block_size, spilled_before = context.target_max_block_size, spilled_mib()
    context.target_max_block_size = 16 << 20
    try:
        batches = stream_batches(open_pairs(tmp_path / "big"), SampleDecoder(image_size, CONTEXT),
                                 np.arange(num_images), batch_size, 2)
        seen = sum(int(batch["valid"].sum()) for batch in batches)
    finally:
        context.target_max_block_size = block_size
    assert seen == num_images
    decoded_mib = num_images * 3 * image_size * image_size / 2**20
    assert spilled_mib() - spilled_before < decoded_mib / 4


def test_empty_inputs(ray_local, tmp_path):
    with LmdbSplitWriter(tmp_path / "lmdb" / "train"):
        pass
    assert count_pairs(tmp_path / "lmdb" / "train") == 0
    assert stream(tmp_path / "lmdb" / "train", []) == []
    (tmp_path / "texts.jsonl").write_text("\n")
    assert read_texts(tmp_path / "texts.jsonl").count() == 0
