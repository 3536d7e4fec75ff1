"""The clip-pytorch dataset layout: read directly, and converted to cn_clip's."""
from __future__ import annotations

import io
import json

from PIL import Image

import numpy as np

from clip_platform.data import PlannedPairsDatasource, iter_texts, open_pairs, records
from clip_platform.data.captions import ConvertConfig, convert_captions, read_caption_json
from clip_platform.train.data import SampleDecoder, count_pairs


def make_layout(root, broken_entry=True):
    (root / "flickr8k-images").mkdir(parents=True)
    entries = []
    for i, colour in enumerate(["red", "green", "blue"]):
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), colour).save(buffer, format="JPEG")
        (root / "flickr8k-images" / f"{i}.jpg").write_bytes(buffer.getvalue())
        entries.append({"image": f"flickr8k-images/{i}.jpg", "caption": [f"第{i}张图", f"图片{i}的第二句描述"]})
    if broken_entry:
        entries.append({"caption": ["没有图片"]})
    (root / "cn_train.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return root / "cn_train.json"


def test_every_caption_becomes_a_pair(tmp_path):
    dataset = read_caption_json(make_layout(tmp_path))
    assert [(p.image_id, p.text_id) for p in dataset.pairs] == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    assert len(dataset.bad) == 1 and dataset.bad[0].kind == records.BAD_FIELD


def test_training_reads_the_layout_directly(tmp_path):
    path = str(make_layout(tmp_path))
    assert count_pairs(path) == 6
    (task,) = PlannedPairsDatasource(open_pairs(path), [np.arange(6)]).get_read_tasks(1)
    (block,) = task()
    batch = SampleDecoder(16, 52)({name: block.column(name).to_numpy(zero_copy_only=False)
                                   for name in block.column_names})
    assert batch["valid"].all() and batch["image"].shape == (6, 3, 16, 16)
    assert list(batch["text_id"]) == [0, 1, 2, 3, 4, 5] and list(batch["image_id"]) == [0, 0, 1, 1, 2, 2]


def test_conversion_keeps_every_caption(tmp_path, ray_local):
    path = make_layout(tmp_path / "src")
    report = convert_captions(ConvertConfig(str(tmp_path / "out"), {"train": str(path)}, lmdb=True))
    assert report["train"]["images"] == 3 and report["train"]["texts"] == 6
    texts = [json.loads(line) for line in (tmp_path / "out" / "train_texts.jsonl").read_text().splitlines()]
    assert [(t["text_id"], t["image_ids"]) for t in texts] == [(0, [0]), (1, [0]), (2, [1]), (3, [1]), (4, [2]),
                                                              (5, [2])]
    assert texts[1]["text"] == "图片0的第二句描述"
    assert sorted(t.text_id for t in iter_texts(tmp_path / "out" / "train_texts.jsonl")) == list(range(6))
    assert count_pairs(str(tmp_path / "out" / "lmdb" / "train")) == 6
