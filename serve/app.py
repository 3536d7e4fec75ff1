"""The Ray Serve application: a FastAPI ingress (`Gateway`) in front of batched model
replicas (`Encoder`), with an optional search index built by the batch jobs.

    python -m serve --checkpoint CKPT [--index DIR] [--host 127.0.0.1] [--port 8000]
    serve run serve/config.yaml
"""

import base64
import binascii
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve

log = logging.getLogger("serve")
PAGE = Path(__file__).with_name("index.html")


@dataclass(frozen=True)
class ServeConfig:
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> anything clip_models.load accepts
    index: str | None = None  # image features from jobs/embed.py (JSONL / Parquet / shard dir)
    index_metadata: str | None = None  # optional JSONL of {"image_id": ..., ...} returned with search hits
    max_items: int = 32  # texts or images per request
    max_image_bytes: int = 10 * 2**20  # per image, after base64 decoding
    max_image_pixels: int = 40_000_000  # decompression bombs are refused before decoding
    max_text_chars: int = 1000  # longer texts are refused; long texts are truncated to context_length tokens
    context_length: int = 52
    max_batch_size: int = 32  # @serve.batch size per queue (texts and images queue separately)
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 8
    num_gpus: float = 0.0  # per Encoder replica; fractions share a GPU
    num_cpus: float = 1.0  # per Encoder replica
    max_ongoing_requests: int = 64  # requests a Gateway replica works on at once
    max_queued_requests: int = 256  # requests waiting for a Gateway replica; beyond this Serve answers 503 at once

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint (--checkpoint PATH or name=PATH)")
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")

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
            import json

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


# ---------------------------------------------------------------- deployments

@serve.deployment(name="Encoder")
class Encoder:
    """Model replica: every loaded checkpoint, with separate batching queues for texts
    and images (@serve.batch gathers concurrent callers)."""

    def __init__(self, config: ServeConfig):
        import torch
        from ray.util import metrics

        import clip_models

        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = {}
        for name, checkpoint in config.checkpoints.items():
            model, preprocess = clip_models.load(checkpoint, device=self.device)
            self.models[name] = (model.eval(), preprocess)
        self.max_batch_seen = {"text": 0, "image": 0}
        self.batch_sizes = metrics.Histogram("clip_serve_batch_size", "items per model batch",
                                             boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("kind",))

    def info(self) -> dict:
        return {name: {"struct": model.config.struct_name(), "embed_dim": model.config.embed_dim,
                       "image_size": model.image_size} for name, (model, _) in self.models.items()} | {
            "_batches": dict(self.max_batch_seen)}

    async def embed_text(self, model: str, text: str):
        return await self._text_batch((model, text))

    async def embed_image(self, model: str, image: bytes):
        result = await self._image_batch((model, image))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _text_batch(self, items: list[tuple[str, str]]) -> list[tuple[list[float], bool]]:
        import torch

        import clip_models
        from clip_models.tokenizer import token_ids

        self._record("text", len(items))
        out: list = [None] * len(items)
        for name, rows in _group(items).items():
            texts = [clip_models.preprocess_text(items[i][1]) for i in rows]
            full = token_ids(texts, 10**6)
            tokens = clip_models.tokenize(texts, self.config.context_length, pad_to_longest=True).to(self.device)
            with torch.no_grad():
                features = torch.nn.functional.normalize(self.models[name][0].encode_text(tokens).float(), dim=-1)
            for row, vector, ids in zip(rows, features.cpu().tolist(), full):
                out[row] = (vector, len(ids) > self.config.context_length)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _image_batch(self, items: list[tuple[str, bytes]]) -> list:
        import torch

        import clip_models

        self._record("image", len(items))
        out: list = [None] * len(items)
        for name, rows in _group(items).items():
            model, preprocess = self.models[name]
            pixels, good = [], []
            for i in rows:
                try:
                    pixels.append(preprocess(clip_models.decode_image(items[i][1], self.config.max_image_pixels)))
                    good.append(i)
                except (ValueError, OSError) as exc:
                    out[i] = ValueError(str(exc))
            if good:
                with torch.no_grad():
                    features = model.encode_image(torch.stack(pixels).to(self.device)).float()
                for i, vector in zip(good, torch.nn.functional.normalize(features, dim=-1).cpu().tolist()):
                    out[i] = vector
        return out

    def _record(self, kind: str, size: int) -> None:
        self.max_batch_seen[kind] = max(self.max_batch_seen[kind], size)
        self.batch_sizes.observe(size, tags={"kind": kind})


def _group(items) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(items):
        groups.setdefault(name, []).append(i)
    return groups


api = FastAPI(title="Chinese-CLIP on Ray Serve",
              description="Embeddings, zero-shot classification and search with Chinese-CLIP models.")


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, encoder, config: ServeConfig):
        from ray.util import metrics

        self.encoder = encoder
        self.config = config
        self.index = Index(config.index, config.index_metadata) if config.index else None
        self.requests = metrics.Counter("clip_serve_requests", "requests by route", tag_keys=("route",))
        self.rejected = metrics.Counter("clip_serve_rejected_inputs", "inputs refused", tag_keys=("reason",))
        self.latency = metrics.Histogram("clip_serve_latency_s", "request latency", tag_keys=("route",),
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])

    # -------------------------------------------------- plumbing
    def _model(self, name: str | None) -> str:
        name = name or self.config.default_model
        if name not in self.config.checkpoints:
            self.rejected.inc(tags={"reason": "unknown_model"})
            raise HTTPException(404, f"unknown model {name!r}; loaded: {', '.join(self.config.checkpoints)}")
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

    async def _embed_texts(self, model: str, texts: list[str]):
        import asyncio

        return await asyncio.gather(*[self.encoder.embed_text.remote(model, self._text(t)) for t in texts])

    async def _embed_images(self, model: str, images: list[bytes]):
        import asyncio

        try:
            return await asyncio.gather(*[self.encoder.embed_image.remote(model, raw) for raw in images])
        except Exception as exc:  # a replica's ValueError arrives wrapped: unwrap to its message
            cause = exc.__cause__ or exc
            message = str(cause).strip().splitlines()[-1] if str(cause).strip() else "unreadable image"
            raise self._bad("bad_image", message.split("ValueError: ")[-1]) from None

    def _timed(self, route: str, start: float) -> None:
        self.requests.inc(tags={"route": route})
        self.latency.observe(time.perf_counter() - start, tags={"route": route})

    # -------------------------------------------------- routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return PAGE.read_text(encoding="utf-8")

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "index": len(self.index.ids) if self.index else 0}

    @api.get("/models")
    async def models(self):
        info = await self.encoder.info.remote()
        batches = info.pop("_batches")
        return {"default": self.config.default_model, "models": info, "max_batch_seen": batches}

    @api.post("/embed/text")
    async def embed_text(self, body: TextsRequest):
        start = time.perf_counter()
        model = self._model(body.model)
        self._count(body.texts, "texts")
        results = await self._embed_texts(model, body.texts)
        self._timed("embed_text", start)
        return {"model": model, "embeddings": [v for v, _ in results], "truncated": [t for _, t in results]}

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
        return {"model": model, "embeddings": vectors}

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
        vectors: list = [None] * len(inputs)
        images = [(i, self._image_bytes(x)) for i, x in enumerate(inputs) if is_data_uri(x)]
        texts = [(i, x) for i, x in enumerate(inputs) if not is_data_uri(x)]
        for (i, _), vector in zip(images, await self._embed_images(model, [raw for _, raw in images])):
            vectors[i] = vector
        text_results = await self._embed_texts(model, [t for _, t in texts])
        for (i, _), (vector, _) in zip(texts, text_results):
            vectors[i] = vector
        self._timed("embeddings", start)
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

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
        text = np.array([v for v, _ in await self._embed_texts(model, prompts)], dtype=np.float32)
        classes = text.reshape(len(body.labels), len(templates), -1).mean(axis=1)
        classes /= np.linalg.norm(classes, axis=1, keepdims=True)
        image = np.array((await self._embed_images(model, [self._image_bytes(body.image)]))[0], dtype=np.float32)
        scale = 100.0  # cn_clip's logit scale after training saturates at ln(100)
        logits = scale * classes @ image
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
        hits = self.index.search(np.asarray(query, dtype=np.float32), body.top_k)
        self._timed("search", start)
        return {"model": model, "results": hits}


def build_app(config: ServeConfig):
    """The bound application: Gateway -> Encoder, with autoscaling and bounded queues."""
    # Clients are bounded at the Gateway; each request fans out into one Encoder call per
    # item, so the Encoder's queue is bounded by the Gateway's limits times max_items.
    encoder = Encoder.options(
        ray_actor_options={"num_gpus": config.num_gpus, "num_cpus": config.num_cpus},
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        max_ongoing_requests=max(config.max_ongoing_requests, 2 * config.max_batch_size), max_queued_requests=-1,
    ).bind(config)
    return Gateway.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=config.max_ongoing_requests,
                           max_queued_requests=config.max_queued_requests).bind(encoder, config)


def app_builder(args: dict):
    """For `serve run serve/config.yaml`: args are ServeConfig fields."""
    return build_app(ServeConfig(**args))


@api.exception_handler(ValueError)
async def _value_error(_, exc: ValueError):
    return JSONResponse(status_code=400, content={"detail": str(exc)})
