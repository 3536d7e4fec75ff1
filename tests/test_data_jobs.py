"""jobs/make_synthetic.py and jobs/build_lmdb.py, run in-process (no Ray: small inputs)."""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_platform import cli
from clip_platform.data import iter_texts, lmdb_io, read_labels, records
from clip_platform.data.synthetic import COLOURS, COUNTS, POSITIONS, SHAPES
from helpers import load_job

ROOT = Path(__file__).resolve().parents[1]


def digest(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and "lmdb" not in p.parts)
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def make(out: Path, *extra: str) -> None:
    load_job("make_synthetic").main(["--output-dir", str(out), "--num-train", "24", "--num-valid", "40",
                                     "--num-test", "8", "--zeroshot-per-class", "1", *extra])


def test_make_synthetic_writes_cn_clip_layout_deterministically(tmp_path, capsys):
    make(tmp_path / "a", "--seed", "3", "--lmdb")
    summary = json.loads(capsys.readouterr().out)
    make(tmp_path / "b", "--seed", "3")
    make(tmp_path / "c", "--seed", "4")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    a = tmp_path / "a"
    for split, num_images in (("train", 24), ("valid", 40), ("test", 8)):
        texts = iter_texts(a / f"{split}_texts.jsonl")
        ids = [records.parse_image_line(line)[0] for line in open(a / f"{split}_imgs.tsv")]
        assert len(ids) == num_images and {i for t in texts for i in t.image_ids} == set(ids)
        assert lmdb_io.num_samples(a / "lmdb" / split) == summary["splits"][split]["num_pairs"]
    # Valid/test scenes are dealt without repeats, so each text names exactly one image.
    assert all(len(t.image_ids) == 1 for t in iter_texts(a / "valid_texts.jsonl"))
    labels = read_labels(a / "zeroshot")
    assert len(labels) == len(COLOURS) * len(SHAPES)
    assert sorted(p.name for p in (a / "zeroshot" / "test").iterdir()) == [f"{i:03d}" for i in range(len(labels))]


POSITION, COUNT, COLOUR, SHAPE = (f"({'|'.join(names)})" for names in (POSITIONS, COUNTS.values(), COLOURS, SHAPES))
CAPTION = re.compile(f"{POSITION}.*?{COUNT}{COLOUR}的{SHAPE}|{COUNT}{COLOUR}的{SHAPE}在{POSITION}")


def parse_caption(text: str) -> tuple[str, str]:
    match = CAPTION.search(text)
    assert match, text
    groups = match.groups()
    return (groups[0], groups[2]) if groups[0] else (groups[7], groups[5])


def test_captions_describe_the_pixels(tmp_path):
    # Learnable means the text is true of the image: the named colour fills part of
    # the named region, and nothing coloured lies outside it.
    make(tmp_path)
    images = {image_id: b64 for image_id, b64 in map(records.parse_image_line, open(tmp_path / "valid_imgs.tsv"))}
    for text in iter_texts(tmp_path / "valid_texts.jsonl"):
        position, colour = parse_caption(text.text)
        pixels = np.asarray(Image.open(io.BytesIO(records.b64decode_image(images[text.image_ids[0]])))
                            .convert("RGB"), dtype=np.int32)
        size = pixels.shape[0]
        named = np.abs(pixels - np.array(COLOURS[colour])).sum(-1) < 60
        left, top, right, bottom = (round(f * size) for f in POSITIONS[position])
        inside = np.zeros_like(named)
        inside[top:bottom, left:right] = True
        assert named[inside].sum() >= 10, text.text
        assert named[~inside].sum() <= 2, text.text


def test_build_lmdb_job_flags_output_and_errors(tmp_path, capsys):
    make(tmp_path)
    capsys.readouterr()
    job = load_job("build_lmdb")
    job.main(["--data_dir", str(tmp_path), "--splits", "valid,test", "--lmdb_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "done!" and json.loads(lines[0])["num_samples"] == 40
    assert lmdb_io.is_split_dir(tmp_path / "out" / "test")
    job.main(["--data-dir", str(tmp_path), "--splits", "test"])  # dash spelling, default lmdb_dir
    assert lmdb_io.is_split_dir(tmp_path / "lmdb" / "test")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(job.main, ["--data_dir", str(tmp_path), "--splits", "train,nope"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "nope_imgs.tsv does not exist" in error and len(error.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("make_synthetic").main, ["--output-dir", str(tmp_path / "x"), "--resolution", "8"])
    assert exit_info.value.code == 2 and "resolution" in capsys.readouterr().err
