"""The Ray Serve application: a FastAPI ingress (`Gateway`) in front of batched, model-multiplexed
replicas (`Encoder`), with an optional search index built by the batch jobs.

    python -m serve --checkpoint CKPT [--index DIR] [--host 127.0.0.1] [--port 8000]
    serve run serve/config.yaml

Several checkpoints are served side by side with Ray Serve model multiplexing: the Gateway
checks the request's `model` against the configured names and calls the Encoder with
`multiplexed_model_id=name`; Serve routes it to a replica that already holds that model,
and each replica keeps at most `max_models_per_replica` of them (LRU).

HTTP reaches the Gateway through Serve's proxy, or with Serve's direct ingress on
(`enable_direct_ingress`, the default of `python -m serve`) straight on the Gateway replica's own port.
"""

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from . import _ray_compat

log = logging.getLogger("serve")
PAGE = Path(__file__).with_name("index.html")
FLOAT_DECIMALS = 8  # embeddings in JSON: 8 decimals of a unit vector (error <= 5e-9), half the bytes of repr


@dataclass(frozen=True)
class ServeConfig:
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> anything clip_models.load accepts
    index: str | None = None  # image features from jobs/embed.py (JSONL / Parquet / shard dir)
    index_metadata: str | None = None  # optional JSONL of {"image_id": ..., ...} returned with search hits
    index_images: str | None = None  # optional cn_clip {split}_imgs.tsv: GET /images/{id} serves the hits' images
    max_items: int = 32  # texts or images per request
    max_image_bytes: int = 10 * 2**20  # per image, after base64 decoding
    max_image_pixels: int = 40_000_000  # decompression bombs are refused before decoding
    max_text_chars: int = 1000  # longer texts are refused; long texts are truncated to context_length tokens
    context_length: int = 52  # token limit per text, [CLS] and [SEP] included
    max_batch_size: int = 64  # texts per model batch (@serve.batch gathers them across requests)
    max_image_batch_size: int = 16  # images per model batch
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill once its first item arrived
    max_models_per_replica: int = 3  # @serve.multiplexed: checkpoints one Encoder replica keeps (LRU)
    torch_threads: int = 0  # intra-op threads per Encoder replica; 0: Ray's default, one per reserved CPU
    access_log: bool = True  # Serve's access-log line per request in each replica (costs CPU at high rates)
    min_replicas: int = 1  # Encoder replicas the autoscaler keeps
    max_replicas: int = 2  # Encoder replicas the autoscaler may start (equal to min_replicas: a fixed count)
    target_ongoing_requests: int = 8  # requests per Encoder replica the autoscaler aims at
    num_gpus: float = 0.0  # per Encoder replica; fractions share a GPU
    num_cpus: float = 1.0  # per Encoder replica
    max_ongoing_requests: int = 64  # requests a Gateway replica works on at once
    max_queued_requests: int = 256  # requests waiting for a Gateway replica; beyond this Serve answers 503 at once

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint (--checkpoint PATH or name=PATH)")
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if self.max_batch_size < 1 or self.max_image_batch_size < 1 or self.max_models_per_replica < 1:
            raise ValueError("max_batch_size, max_image_batch_size and max_models_per_replica must be >= 1")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0 (0: one per reserved CPU)")

    @property
    def default_model(self) -> str:
        return next(iter(self.checkpoints))


# ---------------------------------------------------------------- request bodies

class TextsRequest(BaseModel):
    texts: list[str] = Field(..., examples=[["一只橘色的猫", "北京的夜景"]])
    model: str | None = Field(None, description="a name from GET /models; default the first")


class ImagesRequest(BaseModel):
    images: list[str] = Field(..., description="base64 or data-URI encoded images")
    model: str | None = None


class EmbeddingsRequest(BaseModel):
    input: str | list[str] = Field(..., description="texts; images as data URIs (data:image/...;base64,...)")
    model: str | None = None
    encoding_format: str = Field("float", pattern="^(float|base64)$",
                                 description="base64: little-endian float32 bytes, as OpenAI's API")


class ClassifyRequest(BaseModel):
    image: str = Field(..., description="base64 or data URI")
    labels: list[str] = Field(..., examples=[["杰尼龟", "妙蛙种子", "小火龙", "皮卡丘"]])
    templates: list[str] | None = Field(None, description="prompt templates with {} for the label")
    model: str | None = None


class SearchRequest(BaseModel):
    text: str | None = None
    image: str | None = Field(None, description="base64 or data URI")
    top_k: int = Field(10, ge=1, le=100)
    model: str | None = None


# ---------------------------------------------------------------- helpers

def decode_base64_image(data: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ValueError("data URI must be base64 encoded")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise ValueError(f"image larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None
    if not raw:
        raise ValueError("image is empty")
    return raw


def is_data_uri(value: str) -> bool:
    return value.startswith("data:image/")


def floats(vectors: np.ndarray) -> list:
    """Rows as JSON-ready lists of short floats (json.dumps writes the shortest repr)."""
    return np.round(vectors.astype(np.float64), FLOAT_DECIMALS).tolist()


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def num_items(requests: list[list]) -> int:
    """@serve.batch size of a batch of requests that each carry a list of items."""
    return sum(len(r) for r in requests)


class Index:
    """Normalised image features in memory: exact inner-product top-k."""

    def __init__(self, path: str, metadata: str | None):
        from clip_platform.batch.features import read_features

        features = read_features(path, "image_id")
        vectors = features.vectors.astype(np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        self.ids = features.ids
        self.metadata = {}
        if metadata:
            for line in Path(metadata).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.metadata[int(record["image_id"])] = record

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        scores = self.vectors @ query
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((self.ids[top], -scores[top]))]  # score desc, then id: stable results
        return [{"id": int(self.ids[i]), "score": float(scores[i]), **self._meta(int(self.ids[i]))} for i in top]

    def _meta(self, image_id: int) -> dict:
        meta = self.metadata.get(image_id)
        return {"metadata": meta} if meta else {}


class ImageStore:
    """Images of a cn_clip `{split}_imgs.tsv` by id, read on demand: only the byte offset of
    each line is kept in memory, so a large TSV costs one scan at start-up. Lines are parsed
    by the data plane's TSV parser; bad ones are skipped and counted, as the batch jobs do."""

    def __init__(self, path: str):
        from clip_platform.data.records import parse_image_line

        self.path = path
        self.offsets: dict[int, int] = {}
        self.num_bad = 0
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                parsed = parse_image_line(line, f"{path}@{offset}")
                if isinstance(parsed, tuple):
                    self.offsets[parsed[0]] = offset
                elif parsed is not None:
                    self.num_bad += 1
                offset += len(line)
        if self.num_bad:
            log.warning("%s: %d malformed line(s) skipped", path, self.num_bad)

    def get(self, image_id: int) -> bytes | None:
        from clip_platform.data.records import b64decode_image

        offset = self.offsets.get(image_id)
        if offset is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(offset)
            try:
                return b64decode_image(f.readline().partition(b"\t")[2])
            except ValueError:  # bad base64: the page shows no image rather than failing the request
                return None


def image_media_type(data: bytes) -> str:
    for magic, media in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                         (b"BM", "image/bmp")):
        if data.startswith(magic):
            return media
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


# ---------------------------------------------------------------- deployments

@serve.deployment(name="Encoder")
class Encoder:
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
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
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
        import clip_models

        log.info("loading model %r from %s", name, self.config.checkpoints[name])
        model, preprocess = clip_models.load(self.config.checkpoints[name], device=self.device)
        return model.eval(), preprocess

    async def info(self) -> dict:
        """The requested model's architecture (loads it if this replica does not hold it)."""
        model, _ = await self._model(serve.get_multiplexed_model_id())
        return {"struct": model.config.struct_name(), "embed_dim": model.config.embed_dim,
                "image_size": model.image_size}

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

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=num_items)
    async def _text_batch(self, requests: list[list[str]]) -> list[tuple[np.ndarray, list[bool]]]:
        import torch

        import clip_models
        from clip_models.tokenizer import special_ids, token_ids

        model, _ = await self._model(serve.get_multiplexed_model_id())
        start = time.perf_counter()
        texts = [clip_models.preprocess_text(t) for r in requests for t in r]
        self._record("text", len(texts))
        # Tokenize once without a limit: the full length tells truncation, then cut like cn_clip.
        full = token_ids(texts, 10**6)
        length = self.config.context_length
        _, sep = special_ids()
        rows = [ids if len(ids) <= length else ids[:length - 1] + [sep] for ids in full]
        tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        with torch.inference_mode():
            features = clip_models.normalize_features(model.encode_text(tokens.to(self.device)).float())
        features = features.cpu().numpy()
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

        model, preprocess = await self._model(serve.get_multiplexed_model_id())
        images = [x for r in requests for x in r]
        self._record("image", len(images))
        pixels, good, errors = [], [], [None] * len(images)
        for i, data in enumerate(images):
            try:
                pixels.append(preprocess(clip_models.decode_image(data, self.config.max_image_pixels)))
                good.append(i)
            except (ValueError, OSError) as exc:
                errors[i] = str(exc)
        features = np.zeros((len(images), model.config.embed_dim), np.float32)
        if good:
            with torch.inference_mode():
                encoded = model.encode_image(torch.stack(pixels).to(self.device)).float()
            features[good] = clip_models.normalize_features(encoded).cpu().numpy()
        out, start = [], 0
        for r in requests:
            end = start + len(r)
            out.append((features[start:end], errors[start:end]))
            start = end
        return out

    def _record(self, kind: str, size: int) -> None:
        self.max_batch_seen[kind] = max(self.max_batch_seen[kind], size)
        self.batch_sizes.observe(size, tags={"kind": kind})


async def _none():
    return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


api = FastAPI(title="Chinese-CLIP on Ray Serve",
              description="Embeddings, zero-shot classification and search with Chinese-CLIP models.")


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, encoder, config: ServeConfig):
        from ray.util import metrics

        self.encoder = encoder
        self._coalesced_texts.set_max_batch_size(config.max_batch_size)
        # One handle per model: Serve routes each to replicas that already hold that model.
        self.encoders = {name: encoder.options(multiplexed_model_id=name) for name in config.checkpoints}
        self.config = config
        self.index = Index(config.index, config.index_metadata) if config.index else None
        self.images = ImageStore(config.index_images) if config.index_images else None
        self.model_info: dict[str, dict] = {}  # architecture per model, asked once
        self.requests = metrics.Counter("clip_serve_requests", "requests by route", tag_keys=("route",))
        self.rejected = metrics.Counter("clip_serve_rejected_inputs", "inputs refused", tag_keys=("reason",))
        self.latency = metrics.Histogram("clip_serve_latency_s", "request latency", tag_keys=("route",),
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])

    # -------------------------------------------------- plumbing
    def _model(self, name: str | None) -> str:
        name = name or self.config.default_model
        if name not in self.encoders:
            self.rejected.inc(tags={"reason": "unknown_model"})
            raise HTTPException(404, f"unknown model {name!r}; served models: {', '.join(self.config.checkpoints)}")
        return name

    def _bad(self, reason: str, message: str) -> HTTPException:
        self.rejected.inc(tags={"reason": reason})
        return HTTPException(400, message)

    def _count(self, items: list, what: str) -> None:
        if not items:
            raise self._bad("empty", f"no {what} given")
        if len(items) > self.config.max_items:
            raise HTTPException(413, f"{len(items)} {what} in one request; the limit is {self.config.max_items}")

    def _text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise self._bad("empty_text", "texts must be non-empty strings")
        if len(text) > self.config.max_text_chars:
            raise HTTPException(413, f"a text of {len(text)} characters; the limit is {self.config.max_text_chars}")
        return text

    def _image_bytes(self, data: str) -> bytes:
        try:
            return decode_base64_image(data, self.config.max_image_bytes)
        except ValueError as exc:
            raise self._bad("bad_image", str(exc)) from None

    async def _embed_texts(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """A request's texts travel together, max_batch_size at a time."""
        texts = [self._text(t) for t in texts]
        parts = await asyncio.gather(*[self._coalesced_texts((model, c)) for c in chunks(texts, self.config.max_batch_size)])
        return np.concatenate([v for v, _ in parts]), [t for _, truncated in parts for t in truncated]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=1024,
                 batch_size_fn=lambda items: sum(len(texts) for _, texts in items))
    async def _coalesced_texts(self, items: list[tuple[str, list[str]]]) -> list[tuple[np.ndarray, list[bool]]]:
        """Requests that reach this replica together go to the Encoder as one call per model:
        one Ray call instead of one per request (wait 0: nothing waits that would not have)."""
        groups: dict[str, list[int]] = {}
        for i, (model, _) in enumerate(items):
            groups.setdefault(model, []).append(i)
        replies = await asyncio.gather(*[self.encoders[model].embed_texts.remote([t for i in rows for t in items[i][1]])
                                         for model, rows in groups.items()])
        out: list = [None] * len(items)
        for rows, (vectors, truncated) in zip(groups.values(), replies):
            first = 0
            for i in rows:
                last = first + len(items[i][1])
                out[i] = (vectors[first:last], truncated[first:last])
                first = last
        return out

    async def _embed_images(self, model: str, images: list[bytes]) -> np.ndarray:
        handle = self.encoders[model]
        parts = await asyncio.gather(*[handle.embed_images.remote(c)
                                       for c in chunks(images, self.config.max_image_batch_size)])
        errors = [e for _, errs in parts for e in errs if e]
        if errors:
            raise self._bad("bad_image", errors[0])
        return np.concatenate([v for v, _ in parts])

    def _timed(self, route: str, start: float) -> None:
        self.requests.inc(tags={"route": route})
        self.latency.observe(time.perf_counter() - start, tags={"route": route})

    # -------------------------------------------------- routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return PAGE.read_text(encoding="utf-8")

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "index": len(self.index.ids) if self.index else 0,
                "images": len(self.images.offsets) if self.images else 0}

    @api.get("/models")
    async def models(self):
        """The served models (each one's architecture is asked of a replica once) and, from
        one replica, the largest batches it ran."""
        missing = [name for name in self.encoders if name not in self.model_info]
        for name, info in zip(missing, await asyncio.gather(*[self.encoders[n].info.remote() for n in missing])):
            self.model_info[name] = info
        stats = await self.encoder.stats.remote()
        return {"default": self.config.default_model, "models": {n: self.model_info[n] for n in self.encoders},
                "max_models_per_replica": self.config.max_models_per_replica, **stats}

    @api.post("/embed/text")
    async def embed_text(self, body: TextsRequest):
        start = time.perf_counter()
        model = self._model(body.model)
        self._count(body.texts, "texts")
        vectors, truncated = await self._embed_texts(model, body.texts)
        self._timed("embed_text", start)
        return JSONResponse({"model": model, "embeddings": floats(vectors), "truncated": truncated})

    @api.post("/embed/image")
    async def embed_image(self, request: Request):
        start = time.perf_counter()
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            uploads = form.getlist("images") + form.getlist("image")
            model = self._model(form.get("model"))
            images = [await self._read_upload(u) for u in uploads]
        else:
            try:
                body = ImagesRequest(**await request.json())
            except Exception as exc:
                raise HTTPException(422, f"expected JSON {{'images': [base64, ...]}}: {exc}") from None
            model = self._model(body.model)
            images = [self._image_bytes(b) for b in body.images]
        self._count(images, "images")
        vectors = await self._embed_images(model, images)
        self._timed("embed_image", start)
        return JSONResponse({"model": model, "embeddings": floats(vectors)})

    async def _read_upload(self, upload) -> bytes:
        data = await upload.read(self.config.max_image_bytes + 1)
        if len(data) > self.config.max_image_bytes:
            raise HTTPException(413, f"upload larger than {self.config.max_image_bytes} bytes")
        return data

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest):
        """OpenAI-style: `input` texts and/or image data URIs -> `data[i].embedding`."""
        start = time.perf_counter()
        model = self._model(body.model)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        self._count(inputs, "inputs")
        image_rows = [i for i, x in enumerate(inputs) if is_data_uri(x)]
        text_rows = [i for i, x in enumerate(inputs) if not is_data_uri(x)]
        images = [self._image_bytes(inputs[i]) for i in image_rows]
        texts = [inputs[i] for i in text_rows]
        image_vectors, text_result = await asyncio.gather(
            self._embed_images(model, images) if images else _none(),
            self._embed_texts(model, texts) if texts else _none())
        vectors = np.zeros((len(inputs), (image_vectors if images else text_result[0]).shape[1]), np.float32)
        if images:
            vectors[image_rows] = image_vectors
        if texts:
            vectors[text_rows] = text_result[0]
        if body.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = floats(vectors)
        self._timed("embeddings", start)
        return JSONResponse({"object": "list", "model": model,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encoded)],
                             "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    @api.post("/classify")
    async def classify(self, body: ClassifyRequest):
        """Zero-shot: probabilities of each label, as in Chinese-CLIP's demo."""
        start = time.perf_counter()
        model = self._model(body.model)
        self._count(body.labels, "labels")
        templates = body.templates or ["{}"]
        if any("{}" not in t for t in templates):
            raise self._bad("bad_template", "every template needs a {} for the label")
        prompts = [t.format(label) for label in body.labels for t in templates]
        if len(prompts) > self.config.max_items * 8:
            raise HTTPException(413, f"{len(prompts)} prompts (labels x templates); limit {self.config.max_items * 8}")
        image_bytes = self._image_bytes(body.image)
        (text, _), image = await asyncio.gather(self._embed_texts(model, prompts),
                                                self._embed_images(model, [image_bytes]))
        classes = text.reshape(len(body.labels), len(templates), -1).mean(axis=1)
        classes /= np.linalg.norm(classes, axis=1, keepdims=True)
        scale = 100.0  # cn_clip's logit scale after training saturates at ln(100)
        logits = scale * classes @ image[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        self._timed("classify", start)
        return {"model": model, "labels": body.labels, "probs": probs.tolist()}

    @api.post("/search")
    async def search(self, body: SearchRequest):
        start = time.perf_counter()
        if self.index is None:
            raise HTTPException(404, "no search index loaded (start with --index DIR)")
        model = self._model(body.model)
        if (body.text is None) == (body.image is None):
            raise self._bad("bad_query", "give exactly one of 'text' or 'image'")
        if body.text is not None:
            query = (await self._embed_texts(model, [body.text]))[0][0]
        else:
            query = (await self._embed_images(model, [self._image_bytes(body.image)]))[0]
        hits = self.index.search(query, body.top_k)
        if self.images is not None:
            for hit in hits:
                if hit["id"] in self.images.offsets:
                    hit["image_url"] = f"images/{hit['id']}"
        self._timed("search", start)
        return {"model": model, "results": hits}

    @api.get("/images/{image_id}")
    async def image(self, image_id: int):
        data = self.images.get(image_id) if self.images is not None else None
        if data is None:
            raise HTTPException(404, f"no image {image_id}" + ("" if self.images else " (start with --index-images)"))
        return Response(data, media_type=image_media_type(data), headers={"Cache-Control": "max-age=3600"})


def build_app(config: ServeConfig):
    """The bound application: Gateway -> Encoder, with autoscaling and bounded queues."""
    # Clients are bounded at the Gateway; a request makes one Encoder call per max_batch_size
    # items, so the Encoder's queue is bounded by the Gateway's limits.
    logging_config = {"enable_access_log": config.access_log}
    # A fixed replica count needs no autoscaling metrics (they cost CPU at every request).
    replicas = {"num_replicas": config.min_replicas} if config.min_replicas == config.max_replicas else {
        "autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                               "target_ongoing_requests": config.target_ongoing_requests}}
    encoder = Encoder.options(
        ray_actor_options={"num_gpus": config.num_gpus, "num_cpus": config.num_cpus}, logging_config=logging_config,
        **replicas,
        max_ongoing_requests=max(config.max_ongoing_requests, 2 * config.max_batch_size), max_queued_requests=-1,
    ).bind(config)
    return Gateway.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=config.max_ongoing_requests,
                           max_queued_requests=config.max_queued_requests, logging_config=logging_config,
                           ).bind(encoder, config)


def enable_direct_ingress() -> bool:
    """Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS, Ray 2.60): each Gateway replica
    serves HTTP itself on a port of its own (30000+), so a request skips the proxy actor and the
    Ray calls that carry it to the Gateway (its scope, then its body fetched back from the proxy,
    then the response streamed back): ~9 ms of CPU per request on 2 cores, ~2.5 ms left. Ray's
    processes read the flag when they start: call this before ray.init starts a local Ray (on a
    cluster, set the variable for `ray start`). The proxy keeps serving the usual port as well.
    False (proxy only, warned) on a Ray whose Serve internals were not tested: see _ray_compat."""
    return _ray_compat.enable_direct_ingress()


def gateway_urls(app_name: str, host: str, proxy_port: int, timeout_s: float = 60) -> list[str]:
    """Where to send HTTP: each Gateway replica's own address under direct ingress (asked of the
    Serve controller), else the proxy's. Call after serve.run."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = _ray_compat.direct_ingress_urls(app_name, host, proxy_port)
        if urls or urls is None or time.monotonic() > deadline:
            return urls or [f"http://{host}:{proxy_port}"]
        time.sleep(0.25)


def app_builder(args: dict):
    """For `serve run serve/config.yaml`: args are ServeConfig fields."""
    return build_app(ServeConfig(**args))


@api.exception_handler(ValueError)
async def _value_error(_, exc: ValueError):
    return JSONResponse(status_code=400, content={"detail": str(exc)})
