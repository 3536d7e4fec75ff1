"""Changing a built index in place: `add_features` (--add) encodes more feature files with
the index's trained quantizers, and `remove_ids` (--remove-ids FILE) takes ids out. Both
leave the manifest for last: every file they write has a new name (the next generation of
the id table, a new index shard, a new vector segment), and the manifest switches to them
in one atomic write, so a reader, or a crash, sees the index before or after, never between.

    add      scan and encode the new files as a build does (no training, no tuning): their
             partial indexes are merged onto disk as one more index shard (or added to an
             in-memory index's file), their vectors as one more segment; the id table merges
             the new runs with the current one, so an id already indexed is refused
    remove   the removed ids join a sorted list that searches skip inside FAISS's scan (an id
             selector), and the next id table leaves them out; an id once removed is not added
             again (its codes stay in the inverted lists)

An interrupted --add is resumed by the same command (its work folder is _add/).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from ..data.records import parse_id
from ..io import atomic_path, canonical, write_json
from ..model_info import same_model
from ..ray_context import ensure_ray, get, largest_node_cpus, task_cpus
from . import tasks
from .build import IndexReport, report_of, run_shards, record_partial, record_scan, shard_positions
from .config import IndexConfig
from .metadata import Metadata, merge_id_runs, table_files
from .search import read_manifest
from .sources import plan_inputs
from .vectors import create_segment, segment_file
from .workdir import MANIFEST, BuildDir

log = logging.getLogger(__name__)

ADD_WORK = "_add"


def add_features(config: IndexConfig) -> IndexReport:
    work = BuildDir(config.output, ADD_WORK)
    try:
        return _add(config, work)
    except ValueError:  # the features cannot join (ids, dimensions, files): nothing there to resume
        work.clear()
        raise


def _add(config: IndexConfig, work: BuildDir) -> IndexReport:
    start = time.perf_counter()
    manifest = read_manifest(config.output)
    root = Path(config.output)
    inputs = plan_inputs(config.features, config.rows_per_shard)
    known = {canonical(s["path"]) for s in manifest["sources"]}
    for source in inputs.sources:
        if canonical(source["path"]) in known:
            raise ValueError(f"{source['path']} is indexed in {root} already")
    if inputs.model and manifest.get("model") and not same_model(inputs.model, manifest["model"]):
        raise ValueError(f"the features to add were embedded by {inputs.model.get('name')}, the index by "
                         f"{manifest['model'].get('name')}: one index, one model")
    generation = manifest.get("generation", 0) + 1
    plan = {"add": list(config.features), "sources": inputs.sources, "to_generation": generation}
    saved = work.saved_plan()
    if saved is not None and saved != plan:
        raise ValueError(f"{work.work} holds an unfinished --add of other features; run that again or delete it")
    write_json(work.work / "plan.json", plan)
    ensure_ray()
    base = len(manifest["sources"])
    scans, reused = run_shards(work, "scan", len(inputs.shards), lambda i: tasks.scan_shard.remote(
        inputs.shards[i], base + inputs.shard_sources[i], work.path("scan", i, ".ids.parquet"), None, None, 0, 0,
        0, i), record_scan)
    dims = {s["dim"] for s in scans.values() if s["rows"]}
    num_rows = sum(s["rows"] for s in scans.values())
    if not num_rows:
        raise ValueError(f"no features in {' '.join(config.features)}: nothing to add")
    if dims != {manifest["dim"]}:
        raise ValueError(f"features of {sorted(dims)} dimensions cannot join an index of {manifest['dim']}")

    segments = (manifest.get("vectors") or {}).get("segments", [])
    first = sum(s["rows"] for s in segments) if segments else 0
    firsts = shard_positions(inputs.shards, scans, first)
    tables = table_files(generation)
    sources = [s["path"] for s in manifest["sources"]] + [s["path"] for s in inputs.sources]
    if not (root / tables["table"]).is_file():
        runs = [root / manifest["metadata"]["table"]] + [work.path("scan", i, ".ids.parquet")
                                                          for i in range(len(inputs.shards))]
        offsets = [None] + [firsts[i] - shard.first_row for i, shard in enumerate(inputs.shards)]
        try:
            get(tasks.merge_metadata.remote(runs, offsets, sources, root, generation))
            _refuse_removed(root, manifest, tables)
        except BaseException:
            for name in tables.values():
                (root / name).unlink(missing_ok=True)
            raise
    vectors = root / segment_file(len(segments)) if segments else None
    if vectors is not None:
        create_segment(vectors, num_rows, manifest["dim"])

    on_disk = manifest["layout"] == "ondisk"
    trained = root / manifest["trained"]
    parts, found = run_shards(work, "parts", len(inputs.shards), lambda i: tasks.encode_shard.remote(
        inputs.shards[i], None, None, 0, trained, work.path("parts", i, ".index") if on_disk and scans[i]["rows"]
        else None, vectors, firsts[i] - first), record_partial)  # rows of the new segment
    reused += found
    live = [i for i in range(len(inputs.shards)) if scans[i]["rows"]]
    number = len(manifest["shards"])
    if on_disk:
        shard = {"index": f"populated-{number:05d}.index", "ivfdata": f"merged-{number:05d}.ivfdata"}
        count = get(tasks.merge_parts.remote(trained, [work.path("parts", i, ".index") for i in live],
                                             root / shard["index"], root / shard["ivfdata"]))
        shard.update(count=count, bytes=tasks.file_bytes([root / shard["index"], root / shard["ivfdata"]]))
        shards = manifest["shards"] + [shard]
    else:  # one file holding the whole index: a copy with the new rows, under the next generation's name
        old = manifest["shards"][0]
        name = f"index-{generation:05d}.faiss"
        threads = largest_node_cpus()
        count = get(tasks.build_whole.options(num_cpus=task_cpus(threads)).remote(
            [inputs.shards[i] for i in live], root / old["index"], root / name, threads))
        shards = [{"index": name, "count": count, "bytes": tasks.file_bytes([root / name])}]
    rows_of = [sum(scans[i]["rows"] for i in range(len(inputs.shards)) if inputs.shard_sources[i] == n)
               for n in range(len(inputs.sources))]
    updated = {**manifest, "count": manifest["count"] + num_rows, "shards": shards, "metadata": tables,
               "generation": generation,
               "sources": manifest["sources"] + [{**s, "rows": rows} for s, rows in zip(inputs.sources, rows_of)],
               "history": manifest.get("history", []) + [{"add": list(config.features), "rows": num_rows}]}
    if vectors is not None:
        updated["vectors"] = {**manifest["vectors"], "segments": segments + [
            {"file": vectors.name, "first": first, "rows": num_rows}]}
    _switch(root, manifest, updated)
    work.clear()
    log.info("added %d vectors from %d file(s) to %s: %d in all", num_rows, len(inputs.sources), root,
             updated["count"])
    report = report_of(config, updated, time.perf_counter() - start, reused, {s["node"] for s in parts.values()})
    return dataclasses.replace(report, added=num_rows)


def _refuse_removed(root: Path, manifest: dict, tables: dict[str, str]) -> None:
    """An id removed before cannot come back: its codes stay in the lists, hidden by the selector."""
    removed = manifest.get("removed")
    if not removed:
        return
    back = np.load(root / removed["file"])
    back = back[Metadata(root, tables).ranks(back) >= 0]
    if len(back):
        raise ValueError(f"id {back[0]} was removed from {root} before ({len(back)} such ids in the features); "
                         f"removed ids cannot be added again: give them new ids or rebuild the index")


def remove_ids(config: IndexConfig) -> IndexReport:
    start = time.perf_counter()
    root = Path(config.output)
    manifest = read_manifest(root)
    ids, bad = read_id_list(config.remove_ids)
    table = Metadata(root, manifest["metadata"])
    present = np.unique(ids[table.ranks(ids) >= 0]) if len(ids) else ids
    log.info("%d ids to remove from %s: %d in the index, %d not%s", len(np.unique(ids)), root, len(present),
             len(np.unique(ids)) - len(present), f"; {len(bad)} lines that are no ids skipped, the first: {bad[0]}"
             if bad else "")
    if len(present):
        generation = manifest.get("generation", 0) + 1
        tables = table_files(generation)
        sources = [s["path"] for s in manifest["sources"]]
        merge_id_runs([root / manifest["metadata"]["table"]], [None], sources, root, generation, present)
        old = manifest.get("removed")
        removed = np.union1d(np.load(root / old["file"]) if old else np.zeros(0, np.int64), present)
        name = f"removed-{generation:05d}.npy"
        with atomic_path(root / name) as tmp, open(tmp, "wb") as out:
            np.save(out, removed)
        updated = {**manifest, "count": manifest["count"] - len(present), "metadata": tables,
                   "generation": generation, "removed": {"file": name, "count": len(removed)},
                   "history": manifest.get("history", []) + [{"remove": config.remove_ids, "rows": len(present)}]}
        _switch(root, manifest, updated)
        manifest = updated
    report = report_of(config, manifest, time.perf_counter() - start, 0, set())
    return dataclasses.replace(report, removed=len(present), not_found=len(np.unique(ids)) - len(present),
                               bad_lines=len(bad))


def read_id_list(path: str) -> tuple[np.ndarray, list[str]]:
    """The ids of a file of one id a line (blank lines skipped), and the lines that are no id."""
    ids, bad = [], []
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            value = parse_id(line)
            if value is None:
                bad.append(f"{path} line {number}: {line.strip()[:40]!r}")
            else:
                ids.append(value)
    return np.asarray(ids, np.int64), bad


def _switch(root: Path, old: dict, new: dict) -> None:
    """The manifest names the new files; then the old generation's files go."""
    write_json(root / MANIFEST, new, indent=1)
    keep = {name for name in _files(new)}
    for name in _files(old):
        if name not in keep:
            (root / name).unlink(missing_ok=True)


def _files(manifest: dict) -> list[str]:
    names = list(manifest["metadata"].values())
    names += [s[key] for s in manifest["shards"] for key in ("index", "ivfdata") if key in s]
    if manifest.get("removed"):
        names.append(manifest["removed"]["file"])
    return names
