"""The data plane: cn_clip datasets streamed by Ray Data (DESIGN §3, §4).

Training pairs, decoded for the model, with skipped records counted::

    from clip_platform.data import BadRecordLog, DecodeStage, read_pairs

    bad = BadRecordLog()                                   # one tiny actor, 0 CPUs
    ds = read_pairs("datasets/MUGE/lmdb/train", bad_records=bad)   # or ("datasets/MUGE", "train")
    ds = ds.map_batches(DecodeStage(224, 52, use_augment=False, bad_records=bad),
                        batch_format="numpy")              # no batch_size: fused into the read tasks
    for batch in ds.iter_torch_batches(batch_size=128):    # image [B,3,224,224] u8, tokens [B,52] i64
        features = model.encode_image(batch["image"])      # normalises uint8 pixels on the model's device
    print(bad.summary())                                   # counts and ids of every skipped record

Readers (all return a streaming `ray.data.Dataset`; extra keyword arguments go to
`ray.data.read_datasource`, e.g. `override_num_blocks=`, `concurrency=`):

* `read_pairs(data_path, split=None)`: rows image_id, text_id, text, image (bytes),
  from an LMDB split dir or a TSV + JSONL dataset dir (local or s3:// ...).
* `read_pairs_tsv(images, texts)`: the same from any image TSV / text JSONL paths or globs.
* `read_images(path)`: rows image_id, image (bytes) from an LMDB imgs dir, TSV,
  Parquet (id, image) or image files, for embedding corpora.
* `read_texts(path)`: rows text_id, text, image_ids from JSONL files.
* `read_zeroshot(path)` / `read_labels(path)`: zero-shot folder (`test/<label id>/*`)
  rows image_id, label, image; class names from `label_cn.txt`.
* `count_pairs(data_path, split=None)`: declared pair count, without reading images.

Stage: `DecodeStage(image_size, context_length, use_augment, bad_records)` for
`map_batches` (or `decode_batch(batch, transform, ...)` in a plain loop) turns
`image` bytes into uint8 pixels [3, S, S] (`clip_models.normalize_pixels` finishes them) and `text` into `tokens` [L] + `num_tokens`,
keeping `image_id` / `text_id` / `label`; undecodable records are dropped and reported.

Writers and formats: `LmdbSplitWriter`, `build_lmdb(BuildLmdbConfig)`,
`write_images_tsv`, `write_texts_jsonl`, `safe_loads` (tuples of int/str only),
`make_synthetic(SyntheticConfig)`.
"""
from __future__ import annotations

from .bad_records import BadRecordCounter, BadRecordLog, BadRecordSink, BadRecordSummary
from .build import BuildLmdbConfig, SplitReport, build_lmdb
from .lmdb_io import LmdbSplitWriter, safe_loads
from .readers import (count_pairs, iter_texts, read_images, read_labels, read_pairs, read_pairs_tsv, read_texts,
                      read_zeroshot)
from .records import BadRecord, TextRecord, b64decode_image, b64encode_image, write_images_tsv, write_texts_jsonl
from .sources import ImageFilesDatasource, LinesDatasource, LmdbImagesDatasource, LmdbPairsDatasource
from .stages import DecodeStage, decode_batch
from .synthetic import SyntheticConfig, make_synthetic

__all__ = [
    "BadRecord", "BadRecordCounter", "BadRecordLog", "BadRecordSink", "BadRecordSummary", "BuildLmdbConfig",
    "DecodeStage", "ImageFilesDatasource", "LinesDatasource", "LmdbImagesDatasource", "LmdbPairsDatasource",
    "LmdbSplitWriter", "SplitReport", "SyntheticConfig", "TextRecord", "b64decode_image", "b64encode_image",
    "build_lmdb", "count_pairs", "decode_batch", "iter_texts", "make_synthetic", "read_images", "read_labels",
    "read_pairs", "read_pairs_tsv", "read_texts", "read_zeroshot", "safe_loads", "write_images_tsv",
    "write_texts_jsonl",
]
