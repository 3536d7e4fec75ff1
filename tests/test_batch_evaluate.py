"""Recall evaluation and annotation transform against cn_clip's own scripts: no Ray."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clip_platform import cli
from clip_platform.batch.evaluate import EvaluateConfig, evaluate, transform_annotations
from clip_platform.index.recall import compute_recall
from clip_platform.batch.predictions import read_annotations, read_predictions
from helpers import load_job

ROOT = Path(__file__).resolve().parents[1]


def cn_clip_eval_script(name: str) -> Path:
    """Path of cn_clip's eval/<name>.py; these scripts need only the standard library, numpy and tqdm."""
    spec = importlib.util.find_spec("cn_clip")
    if spec is None:
        pytest.skip("cn_clip (reference) is not installed")
    return Path(spec.submodule_search_locations[0]) / "eval" / f"{name}.py"


def run_cn_clip(name: str, *args) -> None:
    subprocess.run([sys.executable, str(cn_clip_eval_script(name)), *map(str, args)], check=True,
                   capture_output=True, cwd=ROOT)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def ranked(*head: int, filler: int = 100) -> list[int]:
    """Ten distinct ids starting with `head`, padded with ids that are never relevant."""
    return [*head, *range(filler, filler + 10 - len(head))]


# Crafted: hits at rank 1, 3 (R@5), 7 (R@10), a miss, a hit through the second
# of two relevant images, a query with no relevant image, and an extra prediction.
ANNOTATIONS = [
    {"text_id": 1, "text": "红色的圆", "image_ids": [11]},
    {"text_id": 2, "text": "蓝色的方块", "image_ids": [12]},
    {"text_id": 3, "text": "两只猫", "image_ids": [13]},
    {"text_id": 4, "text": "“引号”", "image_ids": [14]},
    {"text_id": 5, "text": "海边", "image_ids": [15, 16]},
    {"text_id": 6, "text": "什么都没有", "image_ids": []},
]
PREDICTIONS = [
    {"text_id": 1, "image_ids": ranked(11)},
    {"text_id": 2, "image_ids": ranked(1, 2, 12)},
    {"text_id": 3, "image_ids": ranked(1, 2, 3, 4, 5, 6, 13)},
    {"text_id": 4, "image_ids": ranked()},
    {"text_id": 5, "image_ids": ranked(16, 1)},
    {"text_id": 6, "image_ids": ranked(11)},
    {"text_id": 99, "image_ids": ranked(11)},  # not in the ground truth: ignored, as cn_clip does
]


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "test_texts.jsonl", ANNOTATIONS), write_jsonl(tmp_path / "pred.jsonl", PREDICTIONS)


def test_recall_matches_hand_computed_numbers(files):
    gt, pred = files
    reference = read_annotations(gt, "t2i")
    recall = compute_recall(reference, read_predictions(pred, "t2i", reference))
    assert (recall.hits1, recall.hits5, recall.hits10, recall.num_queries) == (2, 3, 4, 6)
    assert recall.r1 == 2 / 6 and recall.r5 == 3 / 6 and recall.r10 == 4 / 6


def test_t2i_output_is_byte_identical_to_cn_clip_evaluation(files, tmp_path):
    gt, pred = files
    evaluate(EvaluateConfig(str(gt), str(pred), str(tmp_path / "ours.json")))
    run_cn_clip("evaluation", gt, pred, tmp_path / "theirs.json")
    theirs = (tmp_path / "theirs.json").read_text()
    assert json.loads(theirs)["success"] is True
    assert (tmp_path / "ours.json").read_text() == theirs


def test_transform_and_i2t_evaluation_match_cn_clip(files, tmp_path):
    gt, _ = files
    ours = transform_annotations(gt, tmp_path / "ours.tr.jsonl")
    run_cn_clip("transform_ir_annotation_to_tr", "--input", gt)
    theirs = tmp_path / "test_texts.tr.jsonl"  # cn_clip's naming rule
    assert ours.read_text() == theirs.read_text()
    assert load_job("transform_annotations").main(["--input", str(gt)]) is None and theirs.exists()

    pred = write_jsonl(tmp_path / "pred_tr.jsonl", [
        {"image_id": 11, "text_ids": ranked(1, filler=200)},
        {"image_id": 12, "text_ids": ranked(7, 8, 9, 10, 11, 2, filler=200)},
        {"image_id": 13, "text_ids": ranked(filler=200)},
        {"image_id": 14, "text_ids": ranked(4, filler=200)},
        {"image_id": 15, "text_ids": ranked(9, 5, filler=200)},
        {"image_id": 16, "text_ids": ranked(filler=200)},
    ])
    evaluate(EvaluateConfig(str(theirs), str(pred), str(tmp_path / "ours.json"), mode="i2t"))
    run_cn_clip("evaluation_tr", theirs, pred, tmp_path / "theirs.json")
    assert (tmp_path / "ours.json").read_text() == (tmp_path / "theirs.json").read_text()
    # The text->image file itself is accepted for i2t: transformed in memory, same numbers.
    evaluate(EvaluateConfig(str(gt), str(pred), str(tmp_path / "direct.json"), mode="i2t"))
    assert (tmp_path / "direct.json").read_text() == (tmp_path / "theirs.json").read_text()


def broken(rows: list, line: int, replacement) -> list:
    rows = list(rows)
    rows[line - 1] = replacement
    return rows


@pytest.mark.parametrize("lines, message", [
    (broken(PREDICTIONS, 2, '{"text_id": 2, "image_ids": [1, 2'), "line 2: cannot parse as JSON"),
    (broken(PREDICTIONS, 3, {"image_ids": ranked()}), "line 3: no 'text_id'"),
    (broken(PREDICTIONS, 1, {"text_id": "1", "image_ids": ranked()}), "line 1: invalid text_id '1'"),
    (broken(PREDICTIONS, 1, {"text_id": 1}), "line 1: text_id 1 has no 'image_ids'"),
    (broken(PREDICTIONS, 1, {"text_id": 1, "image_ids": 5}), "line 1: 'image_ids' of text_id 1 is not a list"),
    (broken(PREDICTIONS, 4, {"text_id": 4, "image_ids": ranked()[:9]}), "line 4: text_id 4 has 9 predicted"),
    (broken(PREDICTIONS, 4, {"text_id": 4, "image_ids": [1] * 10}), "line 4: text_id 4 has duplicate ids"),
    (broken(PREDICTIONS, 5, {"text_id": 5, "image_ids": ["16", *ranked()[1:]]}),
     "line 5: .*invalid id '16' at rank 1"),
    (broken(PREDICTIONS, 6, {"text_id": 1, "image_ids": ranked()}),
     "line 6: text_id 1 was already predicted at .*line 1"),
    (PREDICTIONS[1:], "no prediction for text_id 1"),
    ([{"image_id": 1, "text_ids": ranked()}], "line 1: no 'text_id'.*--mode"),
])
def test_malformed_predictions_give_line_numbered_errors_and_cn_clips_error_json(files, tmp_path, lines, message):
    gt, _ = files
    pred = tmp_path / "bad.jsonl"
    pred.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    out = tmp_path / "out.json"
    with pytest.raises(ValueError, match=message):
        evaluate(EvaluateConfig(str(gt), str(pred), str(out)))
    written = json.loads(out.read_text())
    assert written["success"] is False and written["score"] == 0 and written["scoreJson"] == {}
    assert "line" in written["errorMsg"] or "no prediction" in written["errorMsg"]


def test_evaluate_job_reports_user_errors_in_one_line(files, tmp_path, capsys):
    gt, pred = files
    job = load_job("evaluate")
    cli.run(job.main, [str(gt), str(pred), str(tmp_path / "ok.json")])
    assert json.loads(capsys.readouterr().out)["success"] is True
    with pytest.raises(SystemExit) as exit_info:
        cli.run(job.main, [str(gt), str(tmp_path / "absent.jsonl"), str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "absent.jsonl does not exist" in err and len(err.splitlines()) == 1


def test_ground_truth_in_the_wrong_direction_says_how_to_fix_it(files, tmp_path):
    gt, pred = files
    tr = transform_annotations(gt)
    with pytest.raises(ValueError, match="use --mode i2t"):
        evaluate(EvaluateConfig(str(tr), str(pred), str(tmp_path / "out.json")))
