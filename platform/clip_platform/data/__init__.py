"""The data plane: every job reads its records here (docs/architecture.md, "The data plane").

    paths ──▶ image_source / text_source ──▶ PieceDatasource (LMDB, TSV, JSONL, Parquet,
              open_pairs                       webdataset, image files): pieces of the input,
              zeroshot_images                  each a read task; bad records skipped + named
                      │
                      ▼
              decode_batch (in each job's map_batches): decode + transform + tokenize,
              every row kept in place, the undecodable ones flagged `valid` False

* Training (`train/data.py`): `open_pairs(--train-data)` gives pair i of a cn_clip LMDB
  split, a clip-pytorch caption JSON or webdataset shards; `PlannedPairsDatasource` reads
  the sample plan's index blocks in plan order, a row per index.
* Embedding (`batch/embed/`, its `source.py`): `image_source` / `text_source`
  pieces, run as resumable shards.
* Zero-shot (`batch/zeroshot.py`): `read_labels` + `read_zeroshot`.
* Retrieval and evaluation read cn_clip's JSONL with `iter_texts`.
* `read_images` / `read_texts` give the same corpora as plain Ray Datasets, for notebooks.

Bad records have one vocabulary (`records.BAD_*`, `MISSING_*`): readers hand them to a
`BadRecordSink` (`BadRecordCounter` in-process) or carry them in the row they spoil.

Writers and formats: `LmdbSplitWriter`, `build_lmdb(BuildLmdbConfig)`, `write_images_tsv`,
`write_texts_jsonl`, `safe_loads` (tuples of int/str only), `make_synthetic(SyntheticConfig)`.
"""
from __future__ import annotations

from .bad_records import BadRecordCounter, BadRecordSink, BadRecordSummary
from .build import BuildLmdbConfig, SplitReport, build_lmdb
from .indexed import PlannedPairsDatasource, count_pairs, open_pairs
from .lmdb_io import LmdbSplitWriter, safe_loads
from .readers import (image_source, iter_texts, read_images, read_labels, read_texts, read_zeroshot, text_source,
                      zeroshot_images)
from .records import BadRecord, TextRecord, b64decode_image, b64encode_image, write_images_tsv, write_texts_jsonl
from .sources import (ImageFilesDatasource, LinesDatasource, LmdbImagesDatasource, ParquetImagesDatasource, Piece,
                      PieceDatasource, WebDatasetDatasource)
from .stages import decode_batch
from .synthetic import SyntheticConfig, make_synthetic

__all__ = [
    "BadRecord", "BadRecordCounter", "BadRecordSink", "BadRecordSummary", "BuildLmdbConfig", "ImageFilesDatasource",
    "LinesDatasource", "LmdbImagesDatasource", "LmdbSplitWriter", "ParquetImagesDatasource", "Piece",
    "PieceDatasource", "PlannedPairsDatasource", "SplitReport", "SyntheticConfig", "TextRecord",
    "WebDatasetDatasource", "b64decode_image", "b64encode_image", "build_lmdb", "count_pairs", "decode_batch",
    "image_source", "iter_texts", "make_synthetic", "open_pairs", "read_images", "read_labels", "read_texts",
    "read_zeroshot", "safe_loads", "text_source", "write_images_tsv", "write_texts_jsonl", "zeroshot_images",
]
