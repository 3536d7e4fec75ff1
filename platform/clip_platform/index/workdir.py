"""The output directory of an index build, and its resumable work folder.

    manifest.json                 written last: the index is finished when it is there
    populated.index, merged.ivfdata   (or populated-00000.index, merged-00000.ivfdata, ... per shard)
    metadata.arrow, ids.npy          the id table (metadata.py)
    vectors-00000.npy             the vectors in float16 (vectors.py)
    trained.index                 the trained, empty index: --add encodes with it
    _build/plan.json              the inputs and settings this work belongs to
    _build/scan/00007.*           shard 7's sorted id run, its random sample, its record
    _build/queries.npz            the tuning queries: vectors and ids
    _build/parts/00007.*          shard 7's partial index, the exact top-k of the tuning queries over
                                  its rows, and its record

Every file is written atomically and each step's record after its files, so a file with
a record is finished and a resumed build keeps it. `_build/` goes once the manifest is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..io import write_json

MANIFEST = "manifest.json"
WORK = "_build"


def index_files(shard: int, num_shards: int) -> tuple[str, str]:
    """(index file, on-disk inverted lists) of one index shard."""
    if num_shards == 1:
        return "populated.index", "merged.ivfdata"
    return f"populated-{shard:05d}.index", f"merged-{shard:05d}.ivfdata"


class BuildDir:
    def __init__(self, output: str | Path, work: str = WORK):
        self.root = Path(output)
        self.work = self.root / work

    # -- whole-build state
    def manifest(self) -> dict[str, Any] | None:
        return _read_json(self.root / MANIFEST)

    def start(self, plan: dict[str, Any]) -> dict[str, Any] | None:
        """Begin or resume the build of `plan`; the manifest when that build is finished already.
        A directory holding another build (other inputs or settings) is the user's to clear."""
        manifest = self.manifest()
        if manifest is not None:
            if manifest.get("build") == plan:
                return manifest
            raise ValueError(f"{self.root} holds an index built from other features or settings; "
                             f"give another --output or delete it")
        saved = self.saved_plan()
        if saved is not None and saved != plan:
            differs = ", ".join(key for key in plan if plan[key] != saved.get(key))
            raise ValueError(f"{self.root} holds an unfinished build of other {differs}; "
                             f"give another --output or delete {self.work}")
        if saved is None:
            if self.root.is_dir() and any(self.root.iterdir()):
                raise ValueError(f"--output {self.root} is a directory that holds other files")
            write_json(self.work / "plan.json", plan)
        return None

    def finish(self, manifest: dict[str, Any]) -> None:
        write_json(self.root / MANIFEST, manifest, indent=1)
        self.clear()

    def saved_plan(self) -> dict[str, Any] | None:
        return _read_json(self.work / "plan.json")

    def clear(self) -> None:
        """The work folder goes: everything in it is in the finished index."""
        shutil.rmtree(self.work, ignore_errors=True)

    # -- steps of one shard: "scan" or "parts"
    def path(self, step: str, shard: int, suffix: str) -> Path:
        return self.work / step / f"{shard:05d}{suffix}"

    def record(self, step: str, shard: int) -> dict[str, Any] | None:
        return _read_json(self.path(step, shard, ".json"))

    def write_record(self, step: str, shard: int, record: dict[str, Any]) -> None:
        write_json(self.path(step, shard, ".json"), record)

    @property
    def queries(self) -> Path:
        return self.work / "queries.npz"

    @property
    def trained(self) -> Path:
        return self.root / "trained.index"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable bookkeeping is no bookkeeping: that step is redone
