"""Repository layout guards (docs/architecture.md, "Why `platform/` has no `__init__.py`")."""
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
