"""The data plane through a real local Ray: readers, the decode stage, bad-record
reports from workers, and bounded memory while streaming."""
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
from clip_platform.data import (BadRecordLog, BuildLmdbConfig, DecodeStage, LmdbSplitWriter, SyntheticConfig,
                                build_lmdb, count_pairs, make_synthetic, read_images, read_labels, read_pairs,
                                read_texts, read_zeroshot, records)
from clip_platform.data import lmdb_io

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


def collect(ds) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for batch in ds.iter_batches(batch_size=7, batch_format="numpy"):
        for i, key in enumerate(zip(batch["image_id"].tolist(), batch["text_id"].tolist())):
            assert key not in out, f"{key} read twice"
            assert batch["image"].dtype == np.uint8  # pixels; the model normalises them
            out[key] = (clip_models.normalize_pixels(torch.tensor(batch["image"][i])), torch.tensor(batch["tokens"][i]))
    return out


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key, (image, tokens) in expected.items():
        torch.testing.assert_close(got[key][0], image, atol=0, rtol=0)
        assert torch.equal(got[key][1], tokens)


def test_ray_pipeline_yields_the_same_tensors_as_a_plain_loop(ray_local, dataset):
    expected = plain_loop(dataset / "lmdb" / "train")
    assert len(expected) == count_pairs(dataset / "lmdb" / "train") == count_pairs(dataset, "train") == 60
    stage = DecodeStage(IMAGE_SIZE, CONTEXT)
    for source, batch_size in ((read_pairs(dataset / "lmdb" / "train", override_num_blocks=5), None),  # fused
                               (read_pairs(dataset, "train", override_num_blocks=3), 8)):  # TSV + JSONL join
        assert_same(collect(source.map_batches(stage, batch_format="numpy", batch_size=batch_size)), expected)
    # The class form runs in an actor pool, model-loader style.
    actors = read_pairs(dataset / "lmdb", "train").map_batches(
        DecodeStage, fn_constructor_kwargs={"image_size": IMAGE_SIZE, "context_length": CONTEXT},
        batch_format="numpy", batch_size=8, concurrency=1)
    assert_same(collect(actors), expected)


def test_training_augmentation_gives_model_ready_arrays(ray_local, dataset):
    ds = read_pairs(dataset / "lmdb" / "valid").map_batches(DecodeStage(IMAGE_SIZE, CONTEXT, use_augment=True),
                                                         batch_format="numpy", batch_size=4)
    batch = next(iter(ds.iter_torch_batches(batch_size=10)))
    assert batch["image"].shape == (10, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.uint8
    assert batch["tokens"].shape == (10, CONTEXT) and batch["tokens"].dtype == torch.int64


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


def write_messy_tsv(data_dir):
    good = base64.b64encode(jpeg()).decode()
    (data_dir / "train_imgs.tsv").write_text("\n".join([
        f"1\t{good}", f"2\t{base64.b64encode(jpeg()[:60]).decode()}", "3\t####", "garbage line", f"5\t{good}"]))
    (data_dir / "train_texts.jsonl").write_text("\n".join([
        '{"text_id": 10, "text": "好", "image_ids": [1, 5]}', '{"text_id": 11, "text": "坏", "image_ids": [2]}',
        '{"text_id": 12, "text": "缺", "image_ids": [3, 88]}', "{not json}"]))


def test_bad_records_are_skipped_and_reach_the_summary_from_workers(ray_local, tmp_path):
    write_messy_lmdb(tmp_path / "lmdb" / "train")
    bad = BadRecordLog()
    ds = read_pairs(tmp_path / "lmdb" / "train", bad_records=bad, override_num_blocks=3)
    rows = ds.map_batches(DecodeStage(IMAGE_SIZE, CONTEXT, bad_records=bad), batch_format="numpy").take_all()
    assert sorted(r["text_id"] for r in rows) == [10]
    summary = bad.summary()
    assert summary.counts == {records.BAD_IMAGE: 2, records.BAD_BASE64: 1, records.MISSING_IMAGE: 1,
                              records.BAD_PICKLE: 1}
    assert sorted(summary.ids(records.BAD_IMAGE)) == [2, 3] and summary.ids(records.MISSING_IMAGE) == [77]

    write_messy_tsv(tmp_path)
    bad = BadRecordLog()
    ds = read_pairs(tmp_path, "train", bad_records=bad, override_num_blocks=2)
    rows = ds.map_batches(DecodeStage(IMAGE_SIZE, CONTEXT, bad_records=bad), batch_format="numpy").take_all()
    assert sorted((r["image_id"], r["text_id"]) for r in rows) == [(1, 10), (5, 10)]
    summary = bad.summary()
    assert summary.counts == {records.BAD_JSON: 1, records.BAD_LINE: 1, records.BAD_BASE64: 1,
                              records.BAD_IMAGE: 1, records.MISSING_IMAGE: 1}, summary
    assert summary.ids(records.MISSING_IMAGE) == [88] and summary.ids(records.BAD_IMAGE) == [2]
    assert not summary.notes


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
    decoded = read_zeroshot(dataset / "zeroshot" / "test").map_batches(
        DecodeStage(IMAGE_SIZE, CONTEXT), batch_format="numpy").take_batch(24)
    assert decoded["image"].shape == (24, 3, IMAGE_SIZE, IMAGE_SIZE) and set(decoded) == {"image", "image_id",
                                                                                           "label"}


def test_missing_split_is_a_clear_error(ray_local, dataset):
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        read_pairs(dataset, "test")
    with pytest.raises(FileNotFoundError, match="give the split"):
        read_pairs(dataset)


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

    image_size, num_images = 224, 4800
    small = base64.b64encode(jpeg(size=16)).decode()
    with LmdbSplitWriter(tmp_path / "big") as writer:
        for image_id in range(num_images):
            writer.add_image(image_id, small)
            writer.add_pair(image_id, image_id, "一个红色的圆形")
    context = ray.data.DataContext.get_current()
    block_size, spilled_before = context.target_max_block_size, spilled_mib()
    context.target_max_block_size = 16 << 20
    try:
        ds = read_pairs(tmp_path / "big").map_batches(DecodeStage(image_size, CONTEXT), batch_format="numpy")
        seen = sum(len(batch["image_id"]) for batch in ds.iter_batches(batch_size=64, batch_format="numpy"))
    finally:
        context.target_max_block_size = block_size
    assert seen == num_images
    decoded_mib = num_images * 3 * image_size * image_size / 2**20
    assert spilled_mib() - spilled_before < decoded_mib / 4


def test_empty_inputs_give_empty_datasets(ray_local, tmp_path):
    with LmdbSplitWriter(tmp_path / "lmdb" / "train"):
        pass
    assert read_pairs(tmp_path / "lmdb" / "train").count() == 0
    (tmp_path / "train_imgs.tsv").write_text("")
    (tmp_path / "train_texts.jsonl").write_text("\n")
    decoded = read_pairs(tmp_path, "train").map_batches(DecodeStage(IMAGE_SIZE, CONTEXT), batch_format="numpy")
    assert decoded.count() == 0
