"""Data formats without Ray: TSV/JSONL/LMDB in cn_clip's exact layout, the
restricted unpickler, key-range and byte-range sharding, bad records in builds."""
from __future__ import annotations

import base64
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import clip_models
from clip_platform.data import (BuildLmdbConfig, LmdbSplitWriter, SyntheticConfig, TextRecord,
                                b64decode_image, build_lmdb, decode_batch, iter_texts, make_synthetic, safe_loads,
                                write_images_tsv, write_texts_jsonl)
from clip_platform.data import lmdb_io, records
from clip_platform.data.files import iter_lines, list_files, split_ranges
from clip_platform.data.indexed import PlannedPairsDatasource, open_pairs
from clip_platform.data.sources import LinesDatasource, LmdbImagesDatasource, TextLines
from cn_clip_ref import import_cn_clip

CN_CLIP_ROOT = Path(importlib.util.find_spec("cn_clip").origin).parent if importlib.util.find_spec("cn_clip") else None


def jpeg(colour=(200, 30, 30), size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(SyntheticConfig(str(out), num_train=40, num_valid=12, num_test=0, resolution=32,
                                   zeroshot_per_class=0))
    return out


def run_tasks(tasks) -> list[dict]:
    """Run read tasks in this process, as Ray would in workers; rows of all blocks."""
    rows = []
    for task in tasks:
        for block in task():
            rows.extend(block.to_pylist())
    return rows


def lmdb_pairs(split_dir, stop: int | None = None) -> list:
    """Pairs 0..stop-1 of an LMDB split (default all), as the training reader returns them."""
    with lmdb_io.pair_reader(split_dir) as read:
        return [read(i) for i in range(lmdb_io.num_samples(split_dir) if stop is None else stop)]


def source_pairs(data_dir: Path, split: str) -> list[tuple[int, int, str, bytes]]:
    images = dict(records.parse_image_line(line) for line in open(data_dir / f"{split}_imgs.tsv"))
    return sorted((i, t.text_id, t.text, base64.b64decode(images[i]))
                  for t in iter_texts(data_dir / f"{split}_texts.jsonl") for i in t.image_ids)


# ----------------------------------------------------------------- records

def test_base64_standard_and_urlsafe_decode_the_same():
    data = bytes(range(256)) * 3  # holds the bytes that encode to + and /
    assert b64decode_image(base64.b64encode(data)) == data
    assert b64decode_image(base64.urlsafe_b64encode(data).decode() + "\r\n") == data
    for bad in ("!!!not base64", "QUJD=X", "", "QUJDRA"):  # bad chars, bad padding, empty, unpadded
        with pytest.raises(ValueError, match="bad base64"):
            b64decode_image(bad)


def test_text_line_parsing_reports_every_kind_of_bad_line():
    good = records.parse_text_line('{"text_id": 7, "text": "一只猫", "image_ids": [1, "2"]}', "t:1")
    assert good == TextRecord(7, "一只猫", (1, 2))
    assert records.parse_text_line("   \n") is None
    cases = {'{"text_id": 1, "text": "x"': records.BAD_JSON, '[1, 2]': records.BAD_JSON,
             '{"text": "x", "image_ids": [1]}': records.BAD_FIELD,
             '{"text_id": true, "text": "x", "image_ids": [1]}': records.BAD_FIELD,
             '{"text_id": 1, "text": 5, "image_ids": [1]}': records.BAD_FIELD,
             '{"text_id": 1, "text": "x"}': records.BAD_FIELD,
             '{"text_id": 1, "text": "x", "image_ids": ["a"]}': records.BAD_FIELD}
    for line, kind in cases.items():
        assert records.parse_text_line(line, "t:2").kind == kind, line
    assert records.parse_text_line('{"text_id": 1, "text": "x"}', require_image_ids=False).image_ids == ()


def test_image_line_parsing():
    assert records.parse_image_line("12\tQUJD\n") == (12, "QUJD")
    assert records.parse_image_line("no tab here").kind == records.BAD_LINE
    assert records.parse_image_line("abc\tQUJD").kind == records.BAD_ID
    assert records.parse_image_line("1\t2\t3").kind == records.BAD_LINE


# ----------------------------------------------------------------- pickles

class Hostile:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clip_platform_pwned",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(Hostile()),
    pickle.dumps((1, 2, Hostile())),
    pickle.dumps((1, 2, ["a list"])),
    pickle.dumps({"image_id": 1}),
    pickle.dumps((1, 2, 3.5)),
    b"not a pickle at all",
    pickle.dumps((1, 2, "text"))[:-3],
])
def test_restricted_unpickler_rejects_everything_but_tuples_of_int_and_str(payload):
    with pytest.raises(ValueError, match="rejected pickle"):
        safe_loads(payload)
    assert not os.path.exists("/tmp/clip_platform_pwned")


def test_restricted_unpickler_reads_cn_clip_pairs_of_every_protocol():
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert safe_loads(pickle.dumps((3, 9, "一只猫"), protocol=protocol)) == (3, 9, "一只猫")


# ------------------------------------------------------------ cn_clip layout

def write_raw_lmdb(split_dir: Path, pairs: dict[bytes, bytes], images: dict[bytes, bytes]) -> None:
    """An LMDB with exactly the given keys, written the way cn_clip's script does."""
    for name, items in (("pairs", pairs), ("imgs", images)):
        env = lmdb.open(str(split_dir / name), map_size=1 << 30)
        with env.begin(write=True) as txn:
            for key, value in items.items():
                txn.put(key, value)
        env.close()


@pytest.mark.skipif(CN_CLIP_ROOT is None, reason="cn_clip (reference) is not installed")
def test_reads_lmdb_built_by_cn_clips_own_script(dataset, tmp_path):
    script = CN_CLIP_ROOT / "preprocess" / "build_lmdb_dataset.py"
    subprocess.run([sys.executable, str(script), "--data_dir", str(dataset), "--splits", "train",
                    "--lmdb_dir", str(tmp_path)], check=True, capture_output=True)
    got = sorted(lmdb_pairs(tmp_path / "train"))
    assert got == source_pairs(dataset, "train") and len(open_pairs(tmp_path / "train")) == len(got)
    images = run_tasks(LmdbImagesDatasource(tmp_path / "train" / "imgs").get_read_tasks(2))
    assert len(images) == 40 and {r["image_id"] for r in images} == {r[0] for r in got}


def test_written_lmdb_has_cn_clips_exact_keys_and_values(dataset, tmp_path):
    (report,) = build_lmdb(BuildLmdbConfig(str(dataset), ("valid",), lmdb_dir=str(tmp_path)))
    env = lmdb.open(str(tmp_path / "valid" / "pairs"), readonly=True, lock=False)
    with env.begin() as txn:
        keys = sorted(k for k, _ in txn.cursor())
        assert txn.get(b"num_samples") == str(report.num_samples).encode()
        pair = pickle.loads(txn.get(b"0"))  # cn_clip reads with plain pickle.loads
    assert keys == sorted([b"num_samples"] + [str(i).encode() for i in range(report.num_samples)])
    assert isinstance(pair, tuple) and len(pair) == 3 and isinstance(pair[0], int) and isinstance(pair[2], str)
    env = lmdb.open(str(tmp_path / "valid" / "imgs"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"num_images") == b"12"
        value = txn.get(str(pair[0]).encode())
    Image.open(io.BytesIO(base64.urlsafe_b64decode(value.decode()))).load()  # cn_clip's image decode


def cn_clip_lmdb_dataset_class(monkeypatch):
    """cn_clip's real training/data.py LMDBDataset. Its module imports torchvision and
    timm (no CPU build here); their four transforms are stood in by clip_models'
    equivalents. The LMDB access, pickle and base64 handling under test are cn_clip's."""
    clip = import_cn_clip()
    monkeypatch.setattr(clip, "tokenize", clip_models.tokenize, raising=False)
    transforms = types.ModuleType("torchvision.transforms")

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    transforms.Compose = Compose
    transforms.Resize = lambda size, interpolation: (lambda im: im.resize(size[::-1], Image.Resampling.BICUBIC))
    transforms.ToTensor = lambda: clip_models.transforms.to_tensor
    transforms.Normalize = lambda mean, std: clip_models.transforms.normalize
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    timm_data = types.ModuleType("timm.data")
    timm_data.create_transform = None
    for name, module in (("torchvision", torchvision), ("torchvision.transforms", transforms),
                         ("timm", types.ModuleType("timm")), ("timm.data", timm_data)):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("cn_clip_training_data", CN_CLIP_ROOT / "training" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LMDBDataset


@pytest.mark.skipif(CN_CLIP_ROOT is None, reason="cn_clip (reference) is not installed")
def test_our_lmdb_is_read_by_cn_clips_lmdbdataset(dataset, tmp_path, monkeypatch):
    (report,) = build_lmdb(BuildLmdbConfig(str(dataset), ("train",), lmdb_dir=str(tmp_path)))
    pairs = lmdb_pairs(tmp_path / "train", 80)  # in key order, as cn_clip indexes
    ours, _ = decode_batch({"image": [p[3] for p in pairs], "text": [p[2] for p in pairs]},
                        clip_models.image_transform(32), 52)
    lmdb_dataset = cn_clip_lmdb_dataset_class(monkeypatch)(str(tmp_path / "train"), split="train",
                                                             max_txt_length=52, resolution=32)
    assert len(lmdb_dataset) == report.num_samples == 80
    for index in (0, 41, 79):
        image, text, eos_index = lmdb_dataset[index]
        torch.testing.assert_close(image, torch.from_numpy(ours["image"][index]), atol=0, rtol=0)
        assert torch.equal(text, torch.from_numpy(ours["tokens"][index]))
        assert eos_index == ours["num_tokens"][index] - 1


def test_tsv_to_lmdb_round_trip(dataset, tmp_path):
    (report,) = build_lmdb(BuildLmdbConfig(str(dataset), "train", lmdb_dir=str(tmp_path)))
    assert (report.num_images, report.num_samples, report.bad.num_bad) == (40, 80, 0)
    pairs = sorted(lmdb_pairs(tmp_path / "train"))
    assert pairs == source_pairs(dataset, "train")
    # ... and back: TSV + JSONL written from the LMDB rebuild the same LMDB content.
    back = tmp_path / "back"
    back.mkdir()
    images = dict(lmdb_io.iter_images(tmp_path / "train" / "imgs", None, None, []))
    write_images_tsv(back / "train_imgs.tsv", sorted(images.items()))
    write_texts_jsonl(back / "train_texts.jsonl", [TextRecord(t, text, (i,)) for i, t, text, _ in pairs])
    build_lmdb(BuildLmdbConfig(str(back), "train"))
    assert sorted(lmdb_pairs(back / "lmdb" / "train")) == pairs


# ------------------------------------------------------------------ sharding

@pytest.mark.parametrize("num_readers", range(1, 9))
def test_lmdb_shards_cover_every_record_exactly_once(dataset, tmp_path_factory, num_readers):
    lmdb_dir = tmp_path_factory.getbasetemp() / "shard_lmdb"
    if not (lmdb_dir / "train").exists():
        build_lmdb(BuildLmdbConfig(str(dataset), "train", lmdb_dir=str(lmdb_dir)))
    # Planned pair blocks: one read task each, every index once, in the blocks' order.
    order = np.random.default_rng(num_readers).permutation(80)
    source = PlannedPairsDatasource(open_pairs(lmdb_dir / "train"), np.array_split(order, num_readers))
    tasks = source.get_read_tasks(1)
    assert len(tasks) == num_readers
    rows = run_tasks(tasks)
    assert [r["index"] for r in rows] == order.tolist() and not any(r["error"] for r in rows)
    images = run_tasks(LmdbImagesDatasource(lmdb_dir / "train" / "imgs").get_read_tasks(num_readers))
    assert sorted(r["image_id"] for r in images) == list(range(1, 41))


@pytest.mark.parametrize("num_readers", range(1, 9))
def test_line_file_byte_ranges_cover_every_line_exactly_once(tmp_path, num_readers):
    rng = np.random.default_rng(num_readers)
    expected = []
    for f in range(2):  # lines of very different lengths, across two files, one without a final newline
        lines = [f"{f * 1000 + i}\t" + "A" * int(rng.integers(0, 90)) for i in range(57)]
        (tmp_path / f"part{f}.tsv").write_text("\n".join(lines) + ("\n" if f else ""))
        expected += lines
    fs, files = list_files(str(tmp_path / "part*.tsv"))
    for min_bytes in (1, 64, 1 << 20):
        ranges = split_ranges(files, num_readers, min_bytes)
        got = [line.decode() for r in ranges for _, line in iter_lines(fs, r)]
        assert sorted(got) == sorted(expected), (min_bytes, len(ranges))
    source = LinesDatasource(fs, files, TextLines(), min_split_bytes=1)
    assert len(source.get_read_tasks(num_readers)) == num_readers


def test_compressed_lines_are_one_range(tmp_path):
    import gzip

    with gzip.open(tmp_path / "texts.jsonl.gz", "wt", encoding="utf-8") as out:
        out.write('{"text_id": 1, "text": "猫", "image_ids": [1]}\n{"text_id": 2, "text": "狗"}\n')
    fs, files = list_files(str(tmp_path), suffixes=(".jsonl.gz",))
    ranges = split_ranges(files, 4, 1)
    assert len(ranges) == 1 and ranges[0].compressed
    rows = run_tasks(LinesDatasource(fs, files, TextLines()).get_read_tasks(4))
    assert [r["text"] for r in rows] == ["猫", "狗"]


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no"):
        list_files(str(tmp_path / "nothing_*.tsv"))
    with pytest.raises(FileNotFoundError, match="not a cn_clip LMDB split"):
        open_pairs(tmp_path)


# --------------------------------------------------------------- bad records

@pytest.fixture
def messy_dataset(tmp_path) -> Path:
    good = jpeg()
    lines = [
        f"1\t{base64.b64encode(good).decode()}",
        f"2\t{base64.b64encode(good[: len(good) // 2]).decode()}",       # truncated JPEG
        f"3\t{base64.b64encode(b'just some text, not an image').decode()}",  # not an image
        "4\t%%%not-base64%%%",                                           # bad base64
        "5 no tab",                                                      # malformed line
        f"x6\t{base64.b64encode(good).decode()}",                       # non-integer id
        f"1\t{base64.b64encode(jpeg((0, 0, 255))).decode()}",             # repeated id
        f"7\t{base64.urlsafe_b64encode(jpeg((0, 255, 0))).decode()}",     # URL-safe base64 is fine
        "",
    ]
    (tmp_path / "train_imgs.tsv").write_text("\n".join(lines) + "\n")
    texts = [
        '{"text_id": 10, "text": "红色", "image_ids": [1, 7]}',
        '{"text_id": 11, "text": "坏的", "image_ids": [2, 3]}',   # pairs with unreadable images
        '{"text_id": 12, "text": "缺失", "image_ids": [99]}',     # missing image
        '{"text_id": 13, "text": "断了"',                        # malformed JSON
        '{"text_id": 14, "image_ids": [1]}',                     # missing text
    ]
    (tmp_path / "train_texts.jsonl").write_text("\n".join(texts) + "\n")
    return tmp_path


def test_build_skips_counts_and_reports_bad_records(messy_dataset):
    (report,) = build_lmdb(BuildLmdbConfig(str(messy_dataset), "train"))
    bad = report.bad
    assert (report.num_images, report.num_samples) == (2, 2)
    assert bad.counts == {records.BAD_IMAGE: 2, records.BAD_BASE64: 1, records.BAD_LINE: 1, records.BAD_ID: 1,
                          records.DUPLICATE_ID: 1, records.MISSING_IMAGE: 3, records.BAD_JSON: 1,
                          records.BAD_FIELD: 1}
    assert sorted(bad.ids(records.BAD_IMAGE)) == [2, 3] and bad.ids(records.BAD_BASE64) == [4]
    assert bad.ids(records.DUPLICATE_ID) == [1] and sorted(bad.ids(records.MISSING_IMAGE)) == [11, 11, 12]
    assert "unreadable image: 2 (ids 2, 3)" in str(bad)
    # Every record written reads back, with the first of the repeated ids kept.
    pairs = lmdb_pairs(messy_dataset / "lmdb" / "train")
    assert [(p[0], p[1]) for p in pairs] == [(1, 10), (7, 10)]
    assert clip_models.decode_image(pairs[0][3]).getpixel((5, 5))[0] > 150  # red, the first id 1


def test_lmdb_reader_skips_and_reports_hostile_and_broken_records(tmp_path):
    good = base64.b64encode(jpeg()).decode().encode()
    pairs = {b"0": pickle.dumps((1, 10, "好")), b"1": pickle.dumps(Hostile()), b"2": pickle.dumps((99, 12, "缺")),
             b"3": pickle.dumps((2, 13, "坏")), b"5": pickle.dumps((1, 15, "好")), b"num_samples": b"6"}
    images = {b"1": good, b"2": b"@@@", b"num_images": b"2"}
    split = tmp_path / "train"
    (split / "pairs").mkdir(parents=True)
    (split / "imgs").mkdir()
    write_raw_lmdb(split, pairs, images)
    rows = run_tasks(PlannedPairsDatasource(open_pairs(split), [np.arange(3), np.arange(3, 6)]).get_read_tasks(1))
    assert [(r["image_id"], r["text_id"]) for r in rows if not r["error"]] == [(1, 10), (1, 15)]
    errors = [r["error"] for r in rows]
    kinds = ["", records.BAD_PICKLE, records.MISSING_IMAGE, records.BAD_BASE64, records.MISSING_RECORD, ""]
    assert all(error.startswith(kind) for error, kind in zip(errors, kinds)), errors
    assert "id=99" in errors[2] and "id=4" in errors[4]
    assert not os.path.exists("/tmp/clip_platform_pwned")


def test_decode_batch_keeps_every_row_and_flags_undecodable_images():
    good = jpeg()
    batch = {"image_id": np.array([1, 2, 3, 4]), "text_id": np.array([10, 20, 30, 40]),
             "image": np.array([good, good[:40], b"", b"text"], dtype=object),
             "text": np.array(["“猫”", "狗", "鸟", "鱼"], dtype=object)}
    out, bad = decode_batch(batch, clip_models.image_transform(16), 8)
    assert out["image"].shape == (4, 3, 16, 16) and out["image"].dtype == np.float32
    assert out["tokens"].shape == (4, 8) and out["tokens"].dtype == np.int64
    assert torch.equal(torch.from_numpy(out["tokens"][:1]), clip_models.tokenize(['"猫"'], 8))
    assert out["valid"].tolist() == [True, False, False, False] and not out["image"][1:].any()
    assert out["image_id"].tolist() == [1, 2, 3, 4] and out["text_id"].tolist() == [10, 20, 30, 40]
    assert sorted(bad) == [1, 2, 3] and {r.kind for r in bad.values()} == {records.BAD_IMAGE}
    assert [bad[i].id for i in (1, 2, 3)] == [2, 3, 4]
    # Rows outside `todo` are left alone: their caller already knows why.
    out, bad = decode_batch(batch, clip_models.image_transform(16), 8, todo=np.array([False, True, False, False]))
    assert not out["valid"].any() and list(bad) == [1]
    # Plain lists work too, and bytes ending in NUL (BMP row padding) keep every byte.
    bmp = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 0, 0)).save(bmp, format="BMP")
    assert bmp.getvalue().endswith(b"\x00")
    out, bad = decode_batch({"image": [bmp.getvalue()], "image_id": [7]}, clip_models.image_transform(4), 8)
    assert out["image"].shape == (1, 3, 4, 4) and out["image_id"].tolist() == [7] and not bad


def test_lmdb_writer_refuses_repeated_image_ids(tmp_path):
    with LmdbSplitWriter(tmp_path / "s") as writer:
        assert writer.add_image(1, "QUJD") and not writer.add_image(1, "REVG")
        writer.add_pair(1, 5, "x")
    assert lmdb_io.num_samples(tmp_path / "s") == 1
    assert list(lmdb_io.iter_images(tmp_path / "s" / "imgs", None, None, [])) == [(1, b"ABC")]


def test_failed_build_leaves_the_previous_lmdb_intact(dataset, tmp_path, monkeypatch):
    build_lmdb(BuildLmdbConfig(str(dataset), "valid", lmdb_dir=str(tmp_path)))
    from clip_platform.data import build

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(build, "TextLines", explode)
    with pytest.raises(RuntimeError):
        build_lmdb(BuildLmdbConfig(str(dataset), "valid", lmdb_dir=str(tmp_path)))
    assert lmdb_io.num_samples(tmp_path / "valid") == 12


def test_build_config_validation(dataset):
    assert BuildLmdbConfig(str(dataset), "train, valid,train").splits == ("train", "valid")
    with pytest.raises(ValueError, match="at least one split"):
        BuildLmdbConfig(str(dataset), " , ")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        BuildLmdbConfig(str(dataset / "nope"), "train")
    with pytest.raises(FileNotFoundError, match="test_imgs.tsv does not exist"):
        build_lmdb(BuildLmdbConfig(str(dataset), "train,test"))


def test_ids_beyond_int64_and_non_utf8_lines_are_named_bad_records(tmp_path):
    big = '{"text_id": 100000000000000000000000, "text": "大", "image_ids": [1]}'
    assert records.parse_text_line(big, "t.jsonl@0").kind == records.BAD_FIELD
    assert records.parse_text_line('{"text_id": 1, "text": "x", "image_ids": [9223372036854775808]}').kind \
        == records.BAD_FIELD
    assert records.parse_image_line("99999999999999999999\tQUJD", "i.tsv@0").kind == records.BAD_ID
    assert records.parse_id(2**63 - 1) == 2**63 - 1 and records.parse_id(-(2**63)) == -(2**63)
    latin1 = '{"text_id": 2, "text": "café"}'.encode("latin-1")
    bad = records.parse_text_line(latin1, "t.jsonl@40")
    assert bad.kind == records.BAD_LINE and "not UTF-8" in bad.detail and bad.where == "t.jsonl@40"
    # The LMDB builder skips them, so they never reach an int64 column.
    (tmp_path / "train_imgs.tsv").write_text(f"1\t{base64.b64encode(jpeg()).decode()}\n")
    (tmp_path / "train_texts.jsonl").write_bytes(f"{big}\n".encode() + latin1 + b"\n"
                                                 + '{"text_id": 3, "text": "好", "image_ids": [1]}\n'.encode())
    (report,) = build_lmdb(BuildLmdbConfig(str(tmp_path), "train"))
    assert report.num_samples == 1 and report.bad.counts == {records.BAD_FIELD: 1, records.BAD_LINE: 1}


def test_stable_ids_and_brace_patterns(tmp_path):
    from clip_platform.data.files import expand_braces

    assert records.stable_id("000123") == records.stable_id("123.jpg") == 123
    assert records.stable_id("a/123.jpg") != 123 and records.stable_id("cat") == records.stable_id("cat")
    assert 0 <= records.stable_id("cat") < 2**63
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes(b"")
    _, infos = list_files(f"{tmp_path}/{{00000..00001}}.tar")
    assert [i.base_name for i in infos] == ["00000.tar", "00001.tar"]
    with pytest.raises(FileNotFoundError, match="00002.tar matches no"):
        list_files(f"{tmp_path}/{{00000..00002}}.tar")


def test_webdataset_shards_stream_by_key_and_survive_truncation(tmp_path):
    import pyarrow.fs as pafs

    from clip_platform.data.webdataset import TarIndex, iter_samples, split_name
    from helpers import write_tar_shards

    assert split_name("dir/000001.jpg") == ("dir/000001", "jpg") and split_name("k.seg.PNG") == ("k", "seg.png")
    samples = [("000000001", jpeg(), "一"), ("000000002", None, "只有文字"), ("000000003", jpeg(), None)]
    (path,) = write_tar_shards(tmp_path, samples, per_shard=3)
    fs = pafs.LocalFileSystem()
    got = list(iter_samples(fs, str(path), bad := []))
    assert [(s.key, s.image is not None, s.text) for s in got] == [
        ("000000001", True, "一"), ("000000002", False, "只有文字"), ("000000003", True, None)] and not bad
    index = TarIndex.scan(fs, str(path))
    assert index.keys == ["000000001"] and index.num_incomplete == 2
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(path.read_bytes()[:1800])
    got = list(iter_samples(fs, str(truncated), bad := []))
    assert [s.key for s in got] == ["000000001"][:len(got)] and len(bad) == 1
    assert bad[0].kind == records.UNREADABLE_FILE and "cut.tar" in bad[0].where
