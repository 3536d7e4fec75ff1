"""What an index is built from: the feature files behind --features, cut into shards
(one encoding task each), with their sizes and the model the embed job recorded."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.features import PLAN_FILE, FeatureShard, feature_files, plan_shards
from ..io import canonical, file_info, join, parent, read_file
from ..model_info import same_model


@dataclass(frozen=True)
class Inputs:
    shards: list[FeatureShard]
    sources: list[dict[str, Any]]  # {"path", "bytes", "mtime_ns"} per feature file, in shard order
    model: dict[str, Any] | None  # the embed job's model fingerprint, when its _plan.json is beside the files
    shard_sources: list[int]  # each shard's file, as a position in `sources`

    @property
    def known_rows(self) -> int | None:
        """Rows of the whole input when the Parquet footers tell (JSONL must be read to count)."""
        return None if any(s.num_rows < 0 for s in self.shards) else sum(s.num_rows for s in self.shards)


def plan_inputs(paths: Sequence[str], rows_per_shard: int) -> Inputs:
    """Every feature file of `paths` (folders, globs, files; local or URIs), each once, cut into shards."""
    files: list[str] = []
    for path in paths:
        files += feature_files(path)
    seen: set[str] = set()
    for file in files:
        if canonical(file) in seen:
            raise ValueError(f"feature file {file} is given twice by --features; its ids would be indexed twice")
        seen.add(canonical(file))
    shards, shard_sources = [], []
    for number, file in enumerate(files):
        shards += plan_shards(file, rows_per_shard)
        shard_sources += [number] * (len(shards) - len(shard_sources))
    infos = [file_info(f) for f in files]
    sources = [{"path": f, "bytes": i.size, "mtime_ns": i.mtime_ns} for f, i in zip(files, infos)]
    return Inputs(shards, sources, embed_model(files), shard_sources)


def embed_model(files: Sequence[str]) -> dict[str, Any] | None:
    """The model fingerprint the embed job recorded in the folders holding `files`. Features of
    two models live in two spaces, so an index over both would rank nonsense: an error."""
    first: tuple[str, dict] | None = None
    for folder in dict.fromkeys(parent(f) for f in files):
        try:
            plan = json.loads(read_file(join(folder, PLAN_FILE)) or b"null")
        except (OSError, ValueError):
            continue  # no plan (cn_clip's files, hand-made shards): nothing recorded
        model = plan.get("settings", {}).get("model") if isinstance(plan, dict) else None
        if not model:
            continue
        if first is None:
            first = folder, model
        elif not same_model(first[1], model):
            raise ValueError(f"features in {first[0]} were embedded by {first[1].get('name')} "
                             f"({first[1].get('source')}), those in {folder} by {model.get('name')} "
                             f"({model.get('source')}): one index, one model")
    return first[1] if first else None
