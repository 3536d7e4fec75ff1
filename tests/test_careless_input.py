"""Careless input ends every job the same way: one line on stderr, exit code 2, no
traceback, before any work starts and with no files left behind. Most cases are caught
before Ray starts; the jobs run in-process under cli.run, a few as real subprocesses."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_models
from clip_platform import cli
from conftest import TINY_VIT
from helpers import load_job

ROOT = Path(__file__).resolve().parents[1]
TINY_NAMES = ["--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese"]
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+\s+(INFO|WARNING)\b")


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def fails_in_one_line(job: str, argv: list[str], capsys, root: Path) -> str:
    """Run jobs/{job}.py's main under cli.run: exit code 2, one line on stderr naming no
    traceback, no file created under `root`; returns the line."""
    before = files(root)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job(job).main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert files(root) == before
    return err.strip()


def subprocess_fails_in_one_line(job: str, argv: list[str]) -> str:
    """Run jobs/{job}.py: exit code 2 and one line on stderr besides log lines (Ray's start-up)."""
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return clip_models.save_checkpoint(clip_models.create_model(TINY_VIT), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "valid_texts.jsonl"
    path.write_text('{"text_id": 1, "text": "红色的圆形", "image_ids": [1]}\n', encoding="utf-8")
    return path


# ---------------------------------------------------------------- context length

def test_embed_context_length_beyond_the_text_positions(tiny, texts, capsys, tmp_path):
    line = fails_in_one_line("embed", ["--extract-text-feats", "--text-data", texts, "--resume", tiny,
                                       "--context-length", "513"], capsys, tmp_path)
    assert line.endswith(f"--context-length 513 exceeds the 512 text positions of {tiny}")


def test_zeroshot_context_length_of_a_released_model_needs_no_download(capsys, tmp_path):
    line = fails_in_one_line("zeroshot", ["--datapath", tmp_path, "--label-file", tmp_path / "labels.txt",
                                          "--vision-model", "ViT-B-16", "--context-length", "600",
                                          "--save-dir", tmp_path], capsys, tmp_path)
    assert "exceeds the 512 text positions of ViT-B-16" in line


# ---------------------------------------------------------------- output paths

def test_evaluate_output_is_a_directory(texts, tmp_path):
    line = subprocess_fails_in_one_line("evaluate", [texts, texts, tmp_path])
    assert line.endswith(f"OUT {tmp_path} is a directory; give a file path")


def test_knn_output_is_a_directory(texts, capsys, tmp_path):
    line = fails_in_one_line("knn", ["--image-feats", texts, "--text-feats", texts, "--output", tmp_path],
                             capsys, tmp_path)
    assert "--output" in line and "is a directory" in line


def test_zeroshot_save_dir_is_a_file_or_its_output_a_directory(tiny, texts, capsys, tmp_path):
    argv = ["--datapath", tmp_path, "--label-file", texts, "--resume", tiny, "--dataset", "toy"]
    line = fails_in_one_line("zeroshot", [*argv, "--save-dir", texts], capsys, tmp_path)
    assert "--save-dir" in line and "is a file" in line
    (tmp_path / "toy.json").mkdir()
    line = fails_in_one_line("zeroshot", [*argv, "--save-dir", tmp_path], capsys, tmp_path)
    assert "toy.json is a directory" in line


def test_retrieval_eval_output_dir_is_a_file(tiny, texts, capsys, tmp_path):
    line = fails_in_one_line("retrieval_eval", ["--data-dir", tmp_path, "--output-dir", texts, "--resume", tiny],
                             capsys, tmp_path)
    assert "--output-dir" in line and "is a file" in line


# ---------------------------------------------------------------- YAML recipes

def test_finetune_recipe_with_a_syntax_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("finetune:\n  batch_size: [1,\n  lr: 0.1\n")
    assert f"{recipe} line" in subprocess_fails_in_one_line("finetune", ["--config", recipe])


def test_finetune_recipe_with_a_wrongly_typed_value(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("finetune:\n  train_data: x\n  batch_size: abc\n")
    line = fails_in_one_line("finetune", ["--config", recipe], capsys, tmp_path)
    assert line.endswith(f"{recipe}: batch_size: 'abc' is not an integer")


# ---------------------------------------------------------------- corrupt checkpoints

def corrupt_checkpoints(tiny: Path, out: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    model = clip_models.create_model(TINY_VIT)
    made = {"random bytes": out / "random.pt", "empty safetensors": out / "empty.safetensors",
            "truncated safetensors": out / "truncated.safetensors", "truncated pt": out / "truncated.pt",
            "wrong shapes": out / "shapes.pt", "bad config": out / "config.pt"}
    made["random bytes"].write_bytes(os.urandom(4096))
    made["empty safetensors"].write_bytes(b"")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "whole.safetensors"))
    whole = (out / "whole.safetensors").read_bytes()
    made["truncated safetensors"].write_bytes(whole[: len(whole) // 2])
    (out / "whole.safetensors").unlink()
    made["truncated pt"].write_bytes(tiny.read_bytes()[:2000])
    state = dict(model.state_dict())
    state["text_projection"] = torch.zeros(3, 5)
    torch.save(state, made["wrong shapes"])
    torch.save({"format": "clip_models", "config": {"embed_dim": "big"}, "state_dict": model.state_dict()},
               made["bad config"])
    return made


@pytest.fixture(scope="module")
def corrupt(tiny, tmp_path_factory) -> dict[str, Path]:
    return corrupt_checkpoints(tiny, tmp_path_factory.mktemp("corrupt"))


@pytest.mark.parametrize("kind", ["random bytes", "empty safetensors", "truncated safetensors", "truncated pt",
                                  "wrong shapes", "bad config"])
def test_embed_with_a_corrupt_checkpoint(kind, corrupt, texts, capsys, tmp_path):
    line = fails_in_one_line("embed", ["--extract-text-feats", "--text-data", texts, "--resume", corrupt[kind]],
                             capsys, tmp_path)
    assert str(corrupt[kind]) in line


def test_every_resuming_job_checks_the_checkpoint_first(corrupt, tiny, texts, capsys, tmp_path):
    bad = corrupt["random bytes"]
    argvs = {"zeroshot": ["--datapath", tmp_path, "--label-file", texts, "--resume", bad, "--save-dir", tmp_path],
             "retrieval_eval": ["--data-dir", tmp_path, "--output-dir", tmp_path / "eval", "--resume", bad],
             "finetune": ["--train-data", tmp_path, *TINY_NAMES, "--resume", bad]}
    for job, argv in argvs.items():
        assert str(bad) in fails_in_one_line(job, argv, capsys, tmp_path), job
    # finetuning loads --resume into the model its flags name: weights of another size do not fit
    line = fails_in_one_line("finetune", ["--train-data", tmp_path, "--vision-model", "ViT-Tiny", "--text-model",
                                          "RBT3-chinese", "--resume", tiny], capsys, tmp_path)
    assert f"{tiny} does not fit" in line


# ---------------------------------------------------------------- encodings, empty inputs

def test_non_utf8_ground_truth_names_the_file(tmp_path):
    gt = tmp_path / "gt.jsonl"
    gt.write_bytes(b'{"text_id": 1, "text": "\xff", "image_ids": [1]}\n')
    line = subprocess_fails_in_one_line("evaluate", [gt, gt, tmp_path / "out.json"])
    assert line.endswith(f"{gt} line 1: not UTF-8 text (invalid start byte)")


def test_an_error_in_a_ray_task_is_one_line(tmp_path):
    """The corpus is read by Ray tasks: the task's error comes back as the one line, without the
    remote traceback or Ray's report of the other tasks' copies of it."""
    texts, images = tmp_path / "texts.jsonl", tmp_path / "images.jsonl"
    texts.write_text('{"text_id": 1, "feature": [1.0, 0.0]}\n')
    images.write_bytes(b'{"image_id": 1, "feature": [1.0, 0.0]}\n{"image_id": 2, "note": "\xff"}\n')
    line = subprocess_fails_in_one_line("knn", ["--image-feats", images, "--text-feats", texts, "--output",
                                                tmp_path / "predictions.jsonl"])
    assert line.endswith(f"{images} line 2: not UTF-8 text (invalid start byte)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.jsonl", "texts.jsonl"]


def test_empty_inputs_are_refused(tiny, capsys, tmp_path):
    empty = tmp_path / "empty_texts.jsonl"
    empty.write_text("\n")
    line = fails_in_one_line("knn", ["--image-feats", empty, "--text-feats", empty, "--output",
                                     tmp_path / "p.jsonl"], capsys, tmp_path)
    assert line.endswith(f"--image-feats {empty} is empty")
    line = fails_in_one_line("embed", ["--extract-text-feats", "--text-data", empty, "--resume", tiny],
                             capsys, tmp_path)
    assert line.endswith(f"--text-data {empty} is empty")


# ---------------------------------------------------------------- ids beyond int64: skipped and named

def test_ids_beyond_int64_are_skipped_and_named(ray_local, tiny, capsys, tmp_path):
    """A JSONL text_id of 10**23 is one bad record, named, not the end of the job; the LMDB
    builder leaves it out instead of writing an id no int64 column can hold."""
    import base64
    import io
    import json

    from PIL import Image

    texts = tmp_path / "valid_texts.jsonl"
    texts.write_text('{"text_id": 100000000000000000000000, "text": "太大", "image_ids": [1]}\n'
                     '{"text_id": 2, "text": "红色的圆形", "image_ids": [1]}\n', encoding="utf-8")
    load_job("embed").main(["--extract-text-feats", "--text-data", str(texts), "--resume", str(tiny),
                            "--output-dir", str(tmp_path / "out")])
    (report,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert report["num_features"] == 1 and report["skipped"]["counts"] == {"missing or invalid field": 1}
    assert report["skipped"]["examples"]["missing or invalid field"][0]["id"] == "100000000000000000000000"

    image = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image, format="PNG")
    (tmp_path / "valid_imgs.tsv").write_text(f"1\t{base64.b64encode(image.getvalue()).decode()}\n")
    load_job("build_lmdb").main(["--data_dir", str(tmp_path), "--splits", "valid"])
    from clip_platform.data import lmdb_io

    with lmdb_io.pair_reader(tmp_path / "lmdb" / "valid") as read:
        assert lmdb_io.num_samples(tmp_path / "lmdb" / "valid") == 1 and read(0)[1] == 2
