"""The documents' commands stay true. In README.md and every docs/*.md: every
`python jobs/X.py ...` and `python -m serve ...` line parses with that script's own argument
parser (stopped right after parsing, so nothing runs), every file it names under configs/
exists, every benchmarks/ script named exists, every curl line calls a route the Serve app
has, with a JSON body that parses, and every relative link names a file that exists. The
README stays short, and no document tells the project's history. No Ray."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
             for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README_MAX_LINES = 400
MAIN_SCRIPTS = {"jobs/finetune.py", "jobs/embed.py", "jobs/knn.py", "jobs/evaluate.py", "jobs/zeroshot.py",
                "jobs/retrieval_eval.py", "serve/__main__.py"}


def shell_lines(text: str) -> list[str]:
    """Commands in a document's ```bash blocks (continuations joined, comments dropped)
    and in its inline `code` spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    # inline spans with arguments (a bare `python -m serve` in prose names the command, no more)
    lines += re.findall(r"`([^`\n]*python (?:jobs/[^`\s]+|-m serve) [^`\n]+)`", text)
    return lines


def python_commands(text: str) -> list[list[str]]:
    """The words after `python` of every python command in a document."""
    found = []
    for line in shell_lines(text):
        for command in line.split("&&"):
            words = shlex.split(command)
            if "python" in words:
                found.append(words[words.index("python") + 1:])
    return found


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script path, its arguments) of every job and `python -m serve` command."""
    found = []
    for words in python_commands(text):
        if words[:2] == ["-m", "serve"]:
            script, args = "serve/__main__.py", words[2:]
        elif words and words[0].startswith("jobs/"):
            script, args = words[0], words[1:]
        else:
            continue
        # "[--mode i2t]" marks an option: check it too
        found.append((script, [word.strip("[]") for word in args if word.strip("[]")]))
    return found


COMMANDS = [(doc, script, args) for doc, text in DOCUMENTS.items() for script, args in script_commands(text)]


class Parsed(Exception):
    """Raised instead of running the script once its arguments parsed."""


def test_the_documents_are_there():
    for page in ("training", "data", "batch", "index", "serving", "deployment", "operations", "architecture",
                 "benchmarks"):
        assert f"docs/{page}.md" in DOCUMENTS, f"docs/{page}.md is missing"


def test_the_readme_is_short():
    lines = DOCUMENTS["README.md"].count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_the_readme_has_job_and_serve_commands():
    scripts = {script for doc, script, _ in COMMANDS if doc == "README.md"}
    assert MAIN_SCRIPTS <= scripts, f"the README's tour lacks {sorted(MAIN_SCRIPTS - scripts)}"


def test_the_readme_links_every_page():
    for doc in DOCUMENTS:
        if doc.startswith("docs/"):
            assert f"({doc})" in DOCUMENTS["README.md"], f"the README does not link {doc}"


@pytest.mark.parametrize("doc, script, args", COMMANDS,
                         ids=[f"{doc}: {s} {' '.join(a)[:60]}" for doc, s, a in COMMANDS])
def test_command_parses(doc, script, args, monkeypatch):
    assert (ROOT / script).is_file(), f"{doc} runs {script}, which does not exist"
    for arg in args:
        if arg.startswith("configs/"):
            assert (ROOT / arg).is_file(), f"{doc} names {arg}, which does not exist"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise Parsed(parse(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    spec = importlib.util.spec_from_file_location("readme_" + Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Parsed):
        module.main(args)


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_benchmark_scripts_exist(doc):
    for words in python_commands(DOCUMENTS[doc]):
        if words and words[0].startswith("benchmarks/"):
            assert (ROOT / words[0]).is_file(), f"{doc} runs {words[0]}, which does not exist"
    for script in re.findall(r"`python (benchmarks/\S+\.py)", DOCUMENTS[doc]):
        assert (ROOT / script).is_file(), f"{doc} runs {script}, which does not exist"


def curl_calls(text: str) -> list[tuple[str, str | None]]:
    """(path, JSON body or None) of every curl line."""
    calls = []
    for line in shell_lines(text):
        if not line.startswith("curl "):
            continue
        words = shlex.split(line)
        url = next(word for word in words[1:] if "127.0.0.1" in word)
        body = words[words.index("-d") + 1] if "-d" in words else None
        calls.append((url.split("127.0.0.1:8000", 1)[1], body))
    return calls


CURL_DOCUMENTS = [doc for doc, text in DOCUMENTS.items() if curl_calls(text)]


def test_there_are_curl_calls():
    assert sum(len(curl_calls(text)) for text in DOCUMENTS.values()) >= 4


@pytest.mark.parametrize("doc", CURL_DOCUMENTS)
def test_curl_calls_hit_real_routes_with_json_bodies(doc):
    from serve.app import api

    routes = {(path, method.upper()) for path, methods in api.openapi()["paths"].items() for method in methods}
    for path, body in curl_calls(DOCUMENTS[doc]):
        method = "POST" if body is not None or path.startswith(("/embed", "/classify", "/search")) else "GET"
        assert (path, method) in routes, f"{doc} calls {method} {path}, which the app does not serve"
        if body is not None:
            assert isinstance(json.loads(body), dict), body


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_relative_links_resolve(doc):
    base = (ROOT / doc).parent
    for target in re.findall(r"\]\(([^)\s]+)\)", DOCUMENTS[doc]):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        assert (base / path).exists(), f"{doc} links {target}, which does not exist"


# History belongs to git log: no commit hashes (7-40 hex digits with a letter and a digit),
# no "session N" or "round N".
HISTORY = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b|\b(?i:session|round) \d+\b")


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_no_history_in_the_documents(doc):
    found = [match.group(0) for match in HISTORY.finditer(DOCUMENTS[doc])]
    assert not found, f"{doc} tells history ({', '.join(found[:5])}): that is for git log"
