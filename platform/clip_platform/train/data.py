"""Training data: each worker streams its part of the sample plan through Ray Data.

The plan (plan.py) fixes which pair indices a worker consumes; Ray Data looks
them up (a cn_clip LMDB split, or a clip-pytorch caption JSON + image folder) and decodes + transforms them in parallel tasks
anywhere in the cluster, in plan order (preserve_order), so training is exactly
reproducible and resumable. Bad records keep their slot with `valid=False`
(shapes stay static for all_gather) and are excluded from the loss and counted.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

import clip_models

from ..data.lmdb_io import num_samples, open_env, parse_pair
from ..data.captions import is_caption_json, read_caption_json
from ..data.records import BadRecord, b64decode_image

BLOCKS_PER_EPOCH = 64  # index blocks per epoch and rank: enough tasks to spread decoding
DECODE_CPUS = 0.5  # CPUs per decode task


def lmdb_split_dir(path: str) -> Path:
    split = Path(path)
    if not (split / "pairs").is_dir() or not (split / "imgs").is_dir():
        raise FileNotFoundError(f"{path} is not a cn_clip LMDB split (expected {path}/pairs and {path}/imgs) "
                                "nor a clip-pytorch caption JSON; build an LMDB with jobs/build_lmdb.py")
    return split


class LmdbPairs:
    """Random access to a cn_clip LMDB split: pair i -> (image_id, text_id, text, image bytes)."""

    def __init__(self, path: str):
        self.path = str(lmdb_split_dir(path))

    def __len__(self) -> int:
        return num_samples(self.path)

    @contextmanager
    def reader(self):
        split = Path(self.path)
        with open_env(split / "pairs") as pairs_env, open_env(split / "imgs") as imgs_env, \
                pairs_env.begin(buffers=True) as pairs, imgs_env.begin(buffers=True) as imgs:
            yield lambda index: self._read(pairs, imgs, index)

    def _read(self, pairs, imgs, index: int):
        where = f"{self.path}/pairs[{index}]"
        raw = pairs.get(str(index).encode())
        if raw is None:
            return BadRecord("missing_record", index, where, "pair key absent")
        pair = parse_pair(bytes(raw), where)
        if isinstance(pair, BadRecord):
            return pair
        image_id, text_id, text = pair
        b64 = imgs.get(str(image_id).encode())
        if b64 is None:
            return BadRecord("missing_image", image_id, where, f"text {text_id} pairs with an absent image")
        try:
            return image_id, text_id, text, b64decode_image(bytes(b64))
        except ValueError as exc:
            return BadRecord("bad_base64", image_id, where, str(exc))


class CaptionJsonPairs:
    """Random access to the clip-pytorch layout (JSON list + image folder): one pair per caption."""

    def __init__(self, path: str):
        self.path = path
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:  # parsed once per process that reads
            self._dataset = read_caption_json(self.path)
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset.pairs)

    def __getstate__(self):
        return {"path": self.path, "_dataset": None}

    @contextmanager
    def reader(self):
        yield self._read

    def _read(self, index: int):
        pair = self.dataset.pairs[index]
        try:
            return pair.image_id, pair.text_id, pair.text, pair.image_path.read_bytes()
        except OSError as exc:
            return BadRecord("missing_image", pair.image_id, str(pair.image_path), str(exc))


def open_pairs(path: str):
    """The pair source behind a --train-data / --val-data value."""
    return CaptionJsonPairs(path) if is_caption_json(path) else LmdbPairs(path)


def count_pairs(path: str) -> int:
    return len(open_pairs(path))


class SampleDecoder:
    """map_batches callable: pair indices -> uint8 image pixels, token ids, ids, validity."""

    def __init__(self, source: str, image_size: int, context_length: int, use_augment: bool = False):
        self.pairs = open_pairs(source)
        self.image_size = image_size
        self.context_length = context_length
        self.use_augment = use_augment
        self._post_init()

    def _post_init(self):
        self._transform = clip_models.train_transform(self.image_size, self.use_augment, pixels=True)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_transform"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._post_init()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = batch["data"].astype(np.int64)
        n, size = len(indices), self.image_size
        images = np.zeros((n, 3, size, size), dtype=np.uint8)  # the model normalises them on its device
        texts = [""] * n
        out = {"index": indices, "image_id": np.full(n, -1), "text_id": np.full(n, -1),
               "valid": np.ones(n, dtype=bool), "error": np.full(n, "", dtype=object)}
        with self.pairs.reader() as read:
            for row, index in enumerate(indices):
                sample = self._decode(read(int(index)))
                if isinstance(sample, BadRecord):
                    out["valid"][row], out["error"][row] = False, str(sample)
                    continue
                out["image_id"][row], out["text_id"][row], texts[row], images[row] = sample
        out["image"] = images
        out["tokens"] = clip_models.tokenize([clip_models.preprocess_text(t) for t in texts],
                                             self.context_length).numpy()
        return out

    def _decode(self, record):
        if isinstance(record, BadRecord):
            return record
        image_id, text_id, text, data = record
        try:
            return image_id, text_id, text, self._transform(clip_models.decode_image(data)).numpy()
        except (ValueError, OSError) as exc:
            return BadRecord("bad_image", image_id, "decode", str(exc))


def stream_batches(decoder: SampleDecoder, indices: np.ndarray, batch_size: int, concurrency: int):
    """Yield decoded micro-batches (dicts of numpy arrays) for `indices`, in order."""
    import ray.data

    if len(indices) == 0:
        return
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the plan's order is the training order
    context.enable_progress_bars = False
    num_blocks = min(BLOCKS_PER_EPOCH, max(1, len(indices) // batch_size))
    dataset = ray.data.from_numpy(np.array_split(indices.astype(np.int64), num_blocks))  # column "data"
    dataset = dataset.map_batches(decoder, batch_size=batch_size, batch_format="numpy",
                                  compute=ray.data.TaskPoolStrategy(size=concurrency), num_cpus=DECODE_CPUS)
    yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False)
