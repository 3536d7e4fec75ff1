"""Repository layout guards (docs/architecture.md, "Why `platform/` has no `__init__.py`"), and the
import graph: no circles between modules, and the batch jobs imported by no other layer."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_a_source_root_not_a_package():
    # platform/__init__.py would shadow the standard library module in every Ray worker.
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "clip_platform" / "__init__.py").is_file()


def test_import_platform_is_the_standard_library_from_the_repo_root():
    # Ray puts a job's working directory first on every worker's PYTHONPATH: mimic that.
    code = "import platform, clip_platform; print(platform.__file__); platform.python_version()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert str(ROOT) not in out.stdout and out.stdout.strip().endswith("platform.py")


def test_dependencies_declared_without_torchvision():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = " ".join(project["dependencies"] + project["optional-dependencies"]["dev"]).lower()
    for required in ("ray[train,data,serve]", "torch", "transformers", "lmdb", "pillow", "pyarrow", "deepspeed",
                     "numpy", "pyyaml", "pytest"):
        assert required in names
    assert "torchvision" not in names and "timm" not in names


def test_clip_models_never_imports_the_platform_layer():
    for path in (ROOT / "clip_models").glob("*.py"):
        text = path.read_text()
        for banned in ("import ray", "from ray", "deepspeed", "clip_platform", "import serve"):
            assert banned not in text, f"{path.name} mentions {banned!r}"


def test_vocab_is_shipped_with_the_package():
    vocab = (ROOT / "clip_models" / "vocab.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert len(vocab) == 21128 and vocab[0] == "[PAD]"


# ---------------------------------------------------------------- the import graph

SOURCE_ROOTS = {"clip_models": ROOT / "clip_models", "clip_platform": ROOT / "platform" / "clip_platform",
                "serve": ROOT / "serve"}


def _modules() -> dict[str, Path]:
    found = {}
    for top, base in SOURCE_ROOTS.items():
        for path in base.rglob("*.py"):
            parts = [top, *path.relative_to(base).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of this repository it imports, anywhere in its body (imports inside
    functions too). `from pkg import name` counts as importing pkg.name where that is a module."""
    import ast

    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_lazy_imports():
    graph = import_graph()
    assert "clip_platform.index.searcher" in graph["serve.search"]  # imported inside Search.search
    assert "clip_platform.encode.encoder" in graph["clip_platform.encode"]


def test_no_module_imports_itself_back_through_others():
    assert cycles(import_graph()) == []


def test_only_the_batch_jobs_and_the_demo_runner_import_the_batch_package():
    upward = sorted(f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                    if target.startswith("clip_platform.batch") and not name.startswith("clip_platform.batch")
                    and name != "clip_platform.demo")
    assert upward == []
