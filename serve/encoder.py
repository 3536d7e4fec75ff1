"""The model replicas: texts and images to unit-length features, batched across requests
with @serve.batch, several checkpoints multiplexed over the replicas."""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from .batching import chunks, num_items
from .config import ServeConfig

log = logging.getLogger("serve")


@serve.deployment(name="Encoder")
class EncoderDeployment:
    """Model replica. Checkpoints are multiplexed: a request names one with the handle's
    `multiplexed_model_id`, the replica loads it on first use and keeps the most recently
    used `max_models_per_replica`. Texts and images queue separately; @serve.batch gathers
    concurrent requests (each a list of items) and splits every batch by model."""

    async def __init__(self, config: ServeConfig):
        import torch
        from ray.util import metrics

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.max_batch_seen = {"text": 0, "image": 0}
        self.work = {"text_batches": 0, "texts": 0, "text_model_s": 0.0}  # what GET /models reports
        self.batch_sizes = metrics.Histogram("clip_serve_batch_size", "items per model batch",
                                             boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("kind",))
        self._text_batch.set_max_batch_size(config.max_batch_size)
        self._text_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._image_batch.set_max_batch_size(config.max_image_batch_size)
        self._image_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

        async def load(name: str):
            return await asyncio.to_thread(self._load, name)

        # Wired here rather than as a decorator so the LRU size comes from the config.
        self._model = serve.multiplexed(max_num_models_per_replica=config.max_models_per_replica)(load)
        await self._model(config.default_model)  # a replica is ready once it can answer the default model

    def _load(self, name: str):
        """(the checkpoint's encoder on the configured backend, its image preprocessing)."""
        import clip_models
        from clip_platform.encode import ModelEncoder

        log.info("loading model %r from %s (backend %s, precision %s)", name, self.config.checkpoints[name],
                 self.config.backend, self.config.precision)
        encoder = ModelEncoder(self.config.checkpoints[name], precision=self.config.precision,
                               backend=self.config.backend, threads=self.config.torch_threads)
        return encoder, clip_models.image_transform(encoder.info.image_size)

    async def info(self) -> dict:
        """The requested model's architecture (loads it if this replica does not hold it)."""
        encoder, _ = await self._model(serve.get_multiplexed_model_id())
        return {"struct": encoder.info.name, "embed_dim": encoder.info.embed_dim,
                "image_size": encoder.info.image_size, "backend": encoder.backend}

    def stats(self) -> dict:
        """This replica's batching so far: the largest batches, text batches and items, and the
        seconds spent in tokenize + encode_text (the part an offline batch job also pays)."""
        return {"max_batch_seen": dict(self.max_batch_seen), "torch_threads": _torch_threads(), **self.work}

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Unit-length float32 features [N, D] and whether each text was truncated."""
        return await self._text_batch(texts)

    async def embed_images(self, images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Unit-length float32 features [N, D]; errors[i] is a message for an unreadable image."""
        return await self._image_batch(images)

    async def classify(self, labels: list[str], templates: list[str], image: bytes) -> tuple[list[float] | None, str | None]:
        """Zero-shot probabilities of `labels` for the image, as jobs/zeroshot.py computes them
        (clip_platform.encode.classifier), or None and why the image could not be read."""
        import torch

        from clip_platform.encode import classifier

        texts = classifier.prompts(labels, templates)
        parts = await asyncio.gather(self._image_batch([image]), *[
            self._text_batch(c) for c in chunks(texts, self.config.max_batch_size)])
        (image_features, errors), text_parts = parts[0], parts[1:]
        if errors[0]:
            return None, errors[0]
        weights = classifier.class_weights(torch.from_numpy(np.concatenate([v for v, _ in text_parts])), len(labels))
        return classifier.probabilities(torch.from_numpy(image_features), weights)[0].tolist(), None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=num_items)
    async def _text_batch(self, requests: list[list[str]]) -> list[tuple[np.ndarray, list[bool]]]:
        import clip_models
        from clip_models.tokenizer import special_ids, token_ids

        encoder, _ = await self._model(serve.get_multiplexed_model_id())
        start = time.perf_counter()
        texts = [clip_models.preprocess_text(t) for r in requests for t in r]
        self._record("text", len(texts))
        # Tokenize once without a limit: the full length tells truncation, then cut like cn_clip.
        full = token_ids(texts, 10**6)
        length = self.config.context_length
        _, sep = special_ids()
        rows = [ids if len(ids) <= length else ids[:length - 1] + [sep] for ids in full]
        tokens = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        features = encoder.encode_texts(tokens)
        self.work["text_batches"] += 1
        self.work["texts"] += len(texts)
        self.work["text_model_s"] += time.perf_counter() - start
        out, first = [], 0
        for r in requests:
            last = first + len(r)
            out.append((features[first:last], [len(ids) > length for ids in full[first:last]]))
            first = last
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=num_items)
    async def _image_batch(self, requests: list[list[bytes]]) -> list[tuple[np.ndarray, list[str | None]]]:
        import torch

        import clip_models

        encoder, preprocess = await self._model(serve.get_multiplexed_model_id())
        images = [x for r in requests for x in r]
        self._record("image", len(images))
        pixels, good, errors = [], [], [None] * len(images)
        for i, data in enumerate(images):
            try:
                pixels.append(preprocess(clip_models.decode_image(data, self.config.max_image_pixels)))
                good.append(i)
            except (ValueError, OSError) as exc:
                errors[i] = str(exc)
        features = np.zeros((len(images), encoder.info.embed_dim), np.float32)
        if good:
            features[good] = encoder.encode_images(torch.stack(pixels).numpy())
        out, start = [], 0
        for r in requests:
            end = start + len(r)
            out.append((features[start:end], errors[start:end]))
            start = end
        return out

    def _record(self, kind: str, size: int) -> None:
        self.max_batch_seen[kind] = max(self.max_batch_seen[kind], size)
        self.batch_sizes.observe(size, tags={"kind": kind})


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
