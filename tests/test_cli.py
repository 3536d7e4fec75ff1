"""The command-line helper: parsers made from config dataclasses (flag names, defaults,
choices, help from the field comments), recipes checked against the field types, the shared
checks, and cli.run's one-line errors. No Ray is started."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from clip_platform import cli, config
from helpers import load_job

MODES = ("fast", "slow")


@dataclass(frozen=True)
class Toy:
    # a section comment is no field's help
    data_dir: str  # where the data is
    img_batch_size: int = 64  # images per batch, 100% of them
    mode: Literal[MODES] = "fast"  # how to run
    lr: float | None = None
    overwrite: bool = False  # replace what is there
    access_log: bool = True  # a line per request
    extra: dict[str, str] = field(default_factory=dict)  # no command-line form
    splits: str | tuple[str, ...] = (  # a field over
        "train",)  # several lines


def parse(argv: list[str], cls: type = Toy, **kwargs):
    return config.parser(cls, **kwargs).parse_args(argv)


def test_flags_in_both_spellings_and_only_given_ones():
    assert vars(parse(["--data_dir", "d", "--img-batch-size", "8"])) == {"data_dir": "d", "img_batch_size": 8}
    assert vars(parse(["--data-dir", "d", "--img_batch_size", "8", "--lr", "0.5"])) == {
        "data_dir": "d", "img_batch_size": 8, "lr": 0.5}


def test_defaults_come_from_the_dataclass():
    made = config.from_args(Toy, parse(["--data-dir", "d"]))
    assert made == Toy("d")


def test_switches_and_choices():
    args = parse(["--data-dir", "d", "--overwrite", "--no-access-log", "--mode", "slow"])
    assert (args.overwrite, args.access_log, args.mode) == (True, False, "slow")
    with pytest.raises(SystemExit):
        parse(["--data-dir", "d", "--mode", "medium"])


def test_required_and_positional_fields():
    with pytest.raises(SystemExit):
        parse([])
    assert parse(["d"], positional=("data_dir",)).data_dir == "d"


def test_help_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data-dir DIR, --data_dir DIR where the data is" in text
    assert "--img-batch-size N, --img_batch_size N images per batch, 100% of them (default: 64)" in text
    assert "--mode {fast,slow} how to run (default: fast)" in text
    assert "--no-access-log, --no_access_log turn off: a line per request" in text
    assert "a field over" in text and "section comment" not in text
    assert "--extra" not in text  # dicts are the job's to fill


def test_flags_override_the_recipe_and_defaults_do_not():
    recipe = {"data_dir": "r", "img_batch_size": 16, "mode": "slow"}
    made = config.from_args(Toy, parse(["--data-dir", "d", "--img-batch-size", "8"]), recipe)
    assert (made.data_dir, made.img_batch_size, made.mode) == ("d", 8, "slow")


@pytest.mark.parametrize("value, expected", [
    ({"img_batch_size": "abc"}, "r.yaml: img_batch_size: 'abc' is not an integer"),
    ({"img_batch_size": True}, "r.yaml: img_batch_size: True is not an integer"),
    ({"mode": "medium"}, "r.yaml: mode: 'medium' is not one of fast, slow"),
    ({"lr": "fast"}, "r.yaml: lr: 'fast' is not a number or null"),
    ({"overwrite": "yes"}, "r.yaml: overwrite: 'yes' is not true or false"),
    ({"nope": 1}, "r.yaml: unknown option 'nope' for Toy"),
])
def test_recipe_values_are_checked_against_the_field_types(value, expected):
    with pytest.raises(ValueError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        config.build(Toy, {"data_dir": "d"}, value, source="r.yaml")


def test_recipe_numbers_as_yaml_writes_them():
    made = config.build(Toy, {"data_dir": "d", "lr": "5e-5", "splits": ["a", "b"]})
    assert made.lr == 5e-5 and made.splits == ("a", "b")
    assert config.build(Toy, {"data_dir": "d", "lr": 1}).lr == 1.0


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\nb: 2\n")
    with pytest.raises(ValueError, match=f"{bad} line 3 is not valid YAML"):
        config.load_yaml(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        config.load_yaml(bad)
    bad.write_bytes(b"a: \xff\n")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        config.load_yaml(bad)


def test_check_output(tmp_path):
    (tmp_path / "file").write_text("x")
    config.check_output(str(tmp_path / "new" / "out.json"), "--output")
    config.check_output(str(tmp_path), "--save-dir", directory=True)
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        config.check_output(str(tmp_path), "--output")
    with pytest.raises(ValueError, match="is a file; give a directory path"):
        config.check_output(str(tmp_path / "file"), "--save-dir", directory=True)
    with pytest.raises(ValueError, match="file is a file, not a directory"):
        config.check_output(str(tmp_path / "file" / "out.json"), "--output")


def test_check_not_empty(tmp_path):
    (tmp_path / "blank").write_text(" \n\n")
    (tmp_path / "full").write_text("\n{}\n")
    config.check_not_empty(str(tmp_path / "full"), "--text-data")
    config.check_not_empty(str(tmp_path / "absent"), "--text-data")  # the reader says what is missing
    with pytest.raises(ValueError, match="--text-data .*blank is empty"):
        config.check_not_empty(str(tmp_path / "blank"), "--text-data")


def test_user_errors_found_inside_ray_errors():
    from ray.exceptions import RayTaskError

    def raised(exc):
        try:
            raise exc
        except Exception as caught:
            return caught

    task = RayTaskError("f", "Traceback ...", raised(ValueError("bad --thing\nsecond line")))
    assert cli.user_error(task.as_instanceof_cause()) == "bad --thing second line"
    # Ray Data and actor constructors hand back only the text of the remote traceback
    text = 'Traceback:\n  File "x.py", line 1\nclip_models.checkpoint.CheckpointError: x.pt is no checkpoint\n'
    assert cli.user_error(RayTaskError("g", text, raised(RuntimeError("wrapped")))) == "x.pt is no checkpoint"
    # a bug keeps its traceback
    assert cli.user_error(RayTaskError("h", "TypeError: oops\n", raised(TypeError("oops")))) is None
    assert cli.user_error(TypeError("oops")) is None


def test_run_prints_one_line_and_exits_2(capsys):
    def main(argv):
        raise FileNotFoundError("no such file: a.jsonl")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: no such file: a.jsonl")


def test_a_decoding_error_names_the_file(tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_bytes(b'{"text": "\xff"}\n')

    def main(argv):
        with open(path, encoding="utf-8") as lines:
            list(lines)

    with pytest.raises(SystemExit):
        cli.run(main, [])
    assert f"{path} is not UTF-8 text" in capsys.readouterr().err


# cn_clip's flag spellings every job keeps (its scripts' argparse names)
CN_CLIP_FLAGS = {
    "finetune": ["--train-data", "--val-data", "--resume", "--batch-size", "--lr", "--wd", "--warmup",
                 "--max-epochs", "--context-length", "--vision-model", "--text-model", "--accum-freq",
                 "--mask-ratio", "--grad-checkpointing", "--freeze-vision", "--reset-data-offset",
                 "--reset-optimizer", "--distillation", "--teacher-model-name", "--use-augment", "--precision",
                 "--valid-step-interval", "--save-step-frequency", "--clip-weight-path", "--bert-weight-path"],
    "embed": ["--extract-image-feats", "--extract-text-feats", "--image-data", "--text-data",
              "--image-feat-output-path", "--text-feat-output-path", "--img-batch-size", "--text-batch-size",
              "--context-length", "--resume", "--precision", "--vision-model", "--text-model"],
    "knn": ["--image-feats", "--text-feats", "--top-k", "--eval-batch-size", "--output"],
    "zeroshot": ["--datapath", "--label-file", "--dataset", "--save-dir", "--resume", "--img-batch-size",
                 "--context-length", "--num-workers", "--index", "--precision", "--vision-model", "--text-model"],
    "build_lmdb": ["--data_dir", "--splits", "--lmdb_dir"],
    "make_synthetic": ["--output-dir", "--num-train", "--lmdb"],
    "convert_dataset": ["--train", "--valid", "--output-dir", "--image-root", "--lmdb"],
    "retrieval_eval": ["--data-dir", "--split", "--output-dir", "--resume", "--precision"],
    "evaluate": ["--mode"],
}


@pytest.mark.parametrize("job", sorted(CN_CLIP_FLAGS))
def test_every_job_help_lists_cn_clips_flags(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_job(job).main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out.replace(",", " ").split()
    assert [flag for flag in CN_CLIP_FLAGS[job] if flag not in listed] == []


def test_serve_flags_come_from_serve_config(capsys):
    import serve.__main__ as serve_main
    from serve.app import ServeConfig

    with pytest.raises(SystemExit):
        serve_main.main(["--help"])
    listed = capsys.readouterr().out.replace(",", " ").split()
    for f in dataclasses.fields(ServeConfig):
        if f.name != "checkpoints":  # --checkpoint [name=]PATH, repeated
            assert f"--{f.name.replace('_', '-')}" in listed or f"--no-{f.name.replace('_', '-')}" in listed


def test_a_tuple_field_first_takes_several_values_a_str_first_one():
    @dataclass(frozen=True)
    class Paths:
        features: tuple[str, ...] | str  # one or more paths
        splits: str | tuple[str, ...] = "train"  # comma separated, one value

    args = config.parser(Paths).parse_args(["--features", "a", "b", "--splits", "train,valid"])
    built = config.from_args(Paths, args)
    assert built.features == ("a", "b") and built.splits == "train,valid"
