"""The README's commands stay true: every `python jobs/X.py ...` and `python -m serve ...`
line parses with that script's own argument parser (stopped right after parsing, so
nothing runs), every file it names under configs/ exists, and every curl line calls a
route the Serve app has, with a JSON body that parses. No Ray."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def shell_lines() -> list[str]:
    """Commands in the README's ```bash blocks (continuations joined, comments dropped)
    and in its inline `code` spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    # inline spans with arguments (a bare `python -m serve` in prose names the command, no more)
    lines += re.findall(r"`([^`\n]*python (?:jobs/[^`\s]+|-m serve) [^`\n]+)`", README)
    return lines


def script_commands() -> list[tuple[str, list[str]]]:
    """(script path, its arguments) of every job and `python -m serve` command."""
    found = []
    for line in shell_lines():
        for command in line.split("&&"):
            words = shlex.split(command)
            if "python" not in words:
                continue
            words = words[words.index("python") + 1:]
            if words[:2] == ["-m", "serve"]:
                script, args = "serve/__main__.py", words[2:]
            elif words and words[0].startswith("jobs/"):
                script, args = words[0], words[1:]
            else:
                continue
            # "[--mode i2t]" marks an option: check it too
            found.append((script, [word.strip("[]") for word in args if word.strip("[]")]))
    return found


COMMANDS = script_commands()


class Parsed(Exception):
    """Raised instead of running the script once its arguments parsed."""


def test_the_readme_has_job_and_serve_commands():
    scripts = {script for script, _ in COMMANDS}
    assert {"jobs/finetune.py", "jobs/embed.py", "jobs/knn.py", "jobs/evaluate.py", "jobs/zeroshot.py",
            "jobs/retrieval_eval.py", "serve/__main__.py"} <= scripts


@pytest.mark.parametrize("script, args", COMMANDS, ids=[f"{s} {' '.join(a)[:60]}" for s, a in COMMANDS])
def test_readme_command_parses(script, args, monkeypatch):
    assert (ROOT / script).is_file(), f"the README runs {script}, which does not exist"
    for arg in args:
        if arg.startswith("configs/"):
            assert (ROOT / arg).is_file(), f"the README names {arg}, which does not exist"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise Parsed(parse(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    spec = importlib.util.spec_from_file_location("readme_" + Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Parsed):
        module.main(args)


def curl_calls() -> list[tuple[str, str | None]]:
    """(path, JSON body or None) of every curl line."""
    calls = []
    for line in shell_lines():
        if not line.startswith("curl "):
            continue
        words = shlex.split(line)
        url = next(word for word in words[1:] if "127.0.0.1" in word)
        body = words[words.index("-d") + 1] if "-d" in words else None
        calls.append((url.split("127.0.0.1:8000", 1)[1], body))
    return calls


def test_readme_curl_calls_hit_real_routes_with_json_bodies():
    from serve.app import api

    routes = {(path, method.upper()) for path, methods in api.openapi()["paths"].items() for method in methods}
    calls = curl_calls()
    assert len(calls) >= 4
    for path, body in calls:
        method = "POST" if body is not None or path.startswith(("/embed", "/classify", "/search")) else "GET"
        assert (path, method) in routes, f"the README calls {method} {path}, which the app does not serve"
        if body is not None:
            assert isinstance(json.loads(body), dict), body
