"""The options of an index build (`jobs/build_index.py`), declared once."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .. import config as config_io

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_bytes(text: str | int) -> int:
    """"4GB", "512MiB", "1.5g" or a plain number of bytes. GB and GiB both mean 2**30 here:
    a budget is a budget, and one meaning avoids a 7% surprise."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 4GB, 512MB, 1073741824)")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index((unit or "_").lower()))


@dataclass(frozen=True)
class IndexConfig:
    features: tuple[str, ...] | str = ()  # feature PATH(s): embed shard folders, globs, Parquet or cn_clip JSONL files
    output: str = ""  # index directory (an interrupted build of the same input resumes there)
    add: bool = False  # add --features to the index in --output, encoded with its trained quantizers
    remove_ids: str = ""  # FILE of ids (one a line) to remove from the index in --output
    index: str = "auto"  # auto (from corpus size and --max-index-memory), flat, hnsw, ivf, fast (quick to build, for one use), or a faiss factory string
    max_index_memory: str = "4GB"  # memory the served index may take (codes and ids); more splits it in shards
    num_shards: int = 0  # index shards to write (0: one, or as many as --max-index-memory asks for)
    recall_target: float = 0.95  # recall@10 against exact search that the search parameters are tuned to
    tune_queries: int = 1000  # corpus vectors held out of training and used as tuning queries
    rows_per_shard: int = 131072  # feature rows per encoding task (Parquet: whole row groups; JSONL: a file)
    seed: int = 0  # sampling of the training rows and the tuning queries
    train_memory: str = "512MB"  # training sample, held by one task; caps IVF lists at this / (39 x 4 x dim)
    store_vectors: bool = True  # keep the vectors in float16 beside the index: re-ranking of PQ codes, more-like-this

    def __post_init__(self):
        paths = (self.features,) if isinstance(self.features, str) else tuple(self.features)
        object.__setattr__(self, "features", paths)
        if not self.output:
            raise ValueError("--output is required")
        if self.remove_ids:
            if paths or self.add:
                raise ValueError("--remove-ids takes no --features or --add: it removes ids from --output's index")
            if os.path.isdir(self.remove_ids):
                raise ValueError(f"--remove-ids {self.remove_ids} is a directory; give a file of ids, one a line")
            config_io.check_not_empty(self.remove_ids, "--remove-ids")
            return
        if not paths or not all(paths):
            raise ValueError("--features needs at least one PATH")
        for name in ("max_index_memory", "train_memory"):
            if parse_bytes(getattr(self, name)) < 2**20:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is under 1 MB")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"--recall-target must be in (0, 1], got {self.recall_target}")
        for name in ("tune_queries", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_shards < 0:
            raise ValueError(f"--num-shards must not be negative, got {self.num_shards}")
        for path in paths:
            config_io.check_not_empty(path, "--features")
        if not self.add:
            config_io.check_output(self.output, "--output", directory=True,
                                   uri="the index folder stays on a local or shared filesystem: FAISS memory-maps it")

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.max_index_memory)

    @property
    def train_bytes(self) -> int:
        return parse_bytes(self.train_memory)
