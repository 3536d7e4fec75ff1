"""Corpus embedding: cn_clip's extract_features.py over the cluster, resumable.

reader  -> `source`: Ray Data reads the corpus (LMDB imgs dir, TSV, image
           files, Parquet, webdataset; texts JSONL or webdataset captions) through
           the data plane's sources as deterministic shards, rows tagged with
           their shard, finished shards not read at all;
mapper  -> `decode` (CPU tasks: the data plane's decode_batch, bad records kept as
           flagged rows) then `actor` (actor pool: clip_platform.encode's ModelEncoder, loaded
           once per actor on the chosen --backend: torch, ONNX Runtime or OpenVINO; GPUs when
           present);
writer  -> `store`: the driver assembles finished shards and writes each
           atomically as Parquet or cn_clip JSONL, then optionally merges them into
           cn_clip's single feature JSONL (normalised features, as cn_clip).

`config` holds the options and outputs, `pipeline` the Ray Data stages and actor sizing,
`job` planning, resuming and the report. Texts are normalised as cn_clip's datasets do
(lowercase, curly quotes) by the data plane, and each batch is padded to its longest member
rather than to --context-length: padding is masked, so the features are the same.
"""
from ...model_info import ModelInfo, inspect_model
from .config import EmbedConfig, EmbedReport
from .decode import decode_rows
from .actor import EmbedActor
from .job import embed

__all__ = ["EmbedActor", "EmbedConfig", "EmbedReport", "ModelInfo", "decode_rows", "embed", "inspect_model"]
