"""The HTTP ingress: a FastAPI app on the `Gateway` deployment. Bodies are validated by the
schemas; the Gateway applies the configured limits, calls the Encoder (one handle per
multiplexed model) and, for /search, the index.

No `from __future__ import annotations` here: FastAPI reads the routes' body types from their
annotations, which Serve's ingress wrapper cannot resolve from strings."""

import asyncio
import base64
import functools
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from clip_platform.data.lookup import TsvImages
from clip_platform.encode.templates import PLACEHOLDER, ZH_TEMPLATES
from clip_platform.index import open_index

from .batching import chunks
from .config import ServeConfig
from .images import image_media_type
from .limits import RequestBodyLimits
from .schemas import (ClassifyRequest, EmbeddingsRequest, ImagesRequest, ImagesUpload, SearchRequest, TextsRequest,
                      floats)
from .search import SearchFanOut

PAGE = Path(__file__).with_name("index.html")

api = FastAPI(title="Chinese-CLIP on Ray Serve",
              description="Embeddings, zero-shot classification and search with Chinese-CLIP models.")
api.add_middleware(RequestBodyLimits)  # before @serve.ingress takes its copy of the app


@functools.cache
def metrics():
    """This replica's Serve metrics (made on first use, in the replica's process)."""
    from types import SimpleNamespace

    from ray.util import metrics as m

    return SimpleNamespace(
        requests=m.Counter("clip_serve_requests", "requests by route", tag_keys=("route",)),
        rejected=m.Counter("clip_serve_rejected_inputs", "inputs refused", tag_keys=("reason",)),
        latency=m.Histogram("clip_serve_latency_s", "request latency", tag_keys=("route",),
                            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]))


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    metrics().rejected.inc(tags={"reason": "invalid_request"})
    return await request_validation_exception_handler(request, exc)


def validated(schema: type[BaseModel], data) -> BaseModel:
    """A body the route read itself, validated as FastAPI validates declared bodies (422)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, encoder, config: ServeConfig, searchers: list | None = None, index_model: str | None = None):
        """`searchers`: a handle per Search deployment (group of index shards); `index_model`:
        the served model whose features the index holds."""
        RequestBodyLimits.configure(config.request_body_timeout_s, config.max_body_bytes)
        self.encoder = encoder
        self._coalesced_texts.set_max_batch_size(config.max_batch_size)
        # One handle per model: Serve routes each to replicas that already hold that model.
        self.encoders = {name: encoder.options(multiplexed_model_id=name) for name in config.checkpoints}
        self.config = config
        self.index_model = index_model
        # The id table and stored vectors (metadata of hits, vectors for more-like-this), and the
        # shards only when no Search deployment holds them (search_replicas 0).
        self.index = open_index(config.index, shards=[] if searchers else None) if config.index else None
        self.searcher = SearchFanOut(self.index, searchers or ())
        self.images = TsvImages(config.index_images) if config.index_images else None
        self.model_info: dict[str, dict] = {}  # architecture per model, asked once
        self.metrics = metrics()

    # -------------------------------------------------- limits of this configuration
    def _model(self, name: str | None) -> str:
        name = name or self.config.default_model
        if name not in self.encoders:
            self.metrics.rejected.inc(tags={"reason": "unknown_model"})
            raise HTTPException(404, f"unknown model {name!r}; served models: {', '.join(self.config.checkpoints)}")
        return name

    def _too_large(self, reason: str, message: str) -> HTTPException:
        self.metrics.rejected.inc(tags={"reason": reason})
        return HTTPException(413, message)

    def _count(self, num: int, what: str) -> None:
        if num > self.config.max_items:
            raise self._too_large("too_many", f"{num} {what} in one request; the limit is {self.config.max_items}")

    def _text_size(self, length: int) -> None:
        if length > self.config.max_text_chars:
            raise self._too_large("long_text", f"a text of {length} characters; the limit is {self.config.max_text_chars}")

    def _image_size(self, data: bytes) -> bytes:
        if len(data) > self.config.max_image_bytes:
            raise self._too_large("large_image", f"an image of {len(data)} bytes, larger than the limit of "
                                                  f"{self.config.max_image_bytes}")
        return data

    # -------------------------------------------------- calls to the Encoder
    async def _embed_texts(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """A request's texts travel together, max_batch_size at a time."""
        for text in texts:
            self._text_size(len(text))
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
        for image in images:
            self._image_size(image)
        handle = self.encoders[model]
        parts = await asyncio.gather(*[handle.embed_images.remote(c)
                                       for c in chunks(images, self.config.max_image_batch_size)])
        errors = [e for _, errs in parts for e in errs if e]
        if errors:
            raise self._not_an_image(errors[0])
        return np.concatenate([v for v, _ in parts])

    def _not_an_image(self, error: str) -> HTTPException:
        """The Encoder could not decode it: the client sent something that is no image."""
        self.metrics.rejected.inc(tags={"reason": "bad_image"})
        return HTTPException(400, error)

    def _timed(self, route: str, start: float) -> None:
        self.metrics.requests.inc(tags={"route": route})
        self.metrics.latency.observe(time.perf_counter() - start, tags={"route": route})

    # -------------------------------------------------- routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return PAGE.read_text(encoding="utf-8")

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "index": self.index.ntotal if self.index else 0,
                "images": len(self.images) if self.images else 0,
                "images_skipped": self.images.num_bad if self.images else 0}  # malformed --index-images lines

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
        self._count(len(body.texts), "texts")
        vectors, truncated = await self._embed_texts(model, body.texts)
        self._timed("embed_text", start)
        return JSONResponse({"model": model, "embeddings": floats(vectors), "truncated": truncated})

    @api.post("/embed/image", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": ImagesRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "model": {"type": "string"}}}}}}})
    async def embed_image(self, request: Request):
        """JSON `{"images": [base64, ...]}` or a multipart upload of files under `images`."""
        start = time.perf_counter()
        if request.headers.get("content-type", "").startswith("multipart/"):
            async with request.form(max_files=self.config.max_items, max_fields=8) as form:
                upload = validated(ImagesUpload, {"images": form.getlist("images") + form.getlist("image"),
                                                  **({"model": form["model"]} if "model" in form else {})})
                model = self._model(upload.model)
                self._count(len(upload.images), "images")
                images = [await self._read_upload(u) for u in upload.images]
        else:
            try:
                data = await request.json()
            except ValueError as exc:
                raise HTTPException(400, f"expected JSON {{'images': [base64, ...]}} or a multipart upload: {exc}") from None
            body = validated(ImagesRequest, data)
            model = self._model(body.model)
            self._count(len(body.images), "images")
            images = body.images
        vectors = await self._embed_images(model, images)
        self._timed("embed_image", start)
        return JSONResponse({"model": model, "embeddings": floats(vectors)})

    async def _read_upload(self, upload) -> bytes:
        return self._image_size(await upload.read(self.config.max_image_bytes + 1))

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingsRequest):
        """OpenAI-style: `input` texts and/or image data URIs -> `data[i].embedding`."""
        start = time.perf_counter()
        model = self._model(body.model)
        inputs = body.inputs
        self._count(len(inputs), "inputs")
        image_rows = list(body.images)
        text_rows = [i for i in range(len(inputs)) if i not in body.images]
        texts = [inputs[i] for i in text_rows]
        image_vectors, text_result = await asyncio.gather(
            self._embed_images(model, list(body.images.values())) if image_rows else asyncio.sleep(0),  # sleep(0): None
            self._embed_texts(model, texts) if texts else asyncio.sleep(0))
        vectors = np.zeros((len(inputs), (image_vectors if image_rows else text_result[0]).shape[1]), np.float32)
        if image_rows:
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
        """Zero-shot: the probability of each label, computed as jobs/zeroshot.py computes it
        (by default with its Chinese prompt templates)."""
        start = time.perf_counter()
        model = self._model(body.model)
        self._count(len(body.labels), "labels")
        templates = body.templates or list(ZH_TEMPLATES)
        # Sizes are checked before any prompt is built: a template may repeat {} many times.
        if len(body.labels) * len(templates) > self.config.max_prompts:
            raise self._too_large("too_many", f"{len(body.labels) * len(templates)} prompts (labels x templates); "
                                              f"the limit is {self.config.max_prompts}")
        longest = max(len(label) for label in body.labels)
        self._text_size(max(len(t) + t.count(PLACEHOLDER) * (longest - len(PLACEHOLDER)) for t in templates))
        probs, error = await self.encoders[model].classify.remote(body.labels, templates, self._image_size(body.image))
        if error:
            raise self._not_an_image(error)
        self._timed("classify", start)
        return {"model": model, "labels": body.labels, "probs": probs}

    @api.post("/search")
    async def search(self, body: SearchRequest):
        """The index's nearest items to a text, an image or one of its own items (more like
        this), with their scores and metadata; every Search group is asked and the top-k merged."""
        start = time.perf_counter()
        if self.index is None:
            raise HTTPException(404, "no search index loaded (start with --index DIR)")
        model = body.model or self.index_model
        if model != self.index_model:
            self._model(model)  # an unknown name is a 404 naming the served ones
            raise HTTPException(400, f"the index holds features of model {self.index_model!r}, not {model!r}")
        if body.text is not None:
            query = (await self._embed_texts(model, [body.text]))[0]
        elif body.image is not None:
            query = await self._embed_images(model, [body.image])
        else:
            query = await self._stored_vector(body.id)
        scores, ids = await self.searcher.search(query, body.top_k)
        hits = [(int(i), float(score)) for i, score in zip(ids[0], scores[0]) if i >= 0]
        metadata = await asyncio.to_thread(self._lookup, [i for i, _ in hits])
        results = []
        for i, score in hits:
            results.append({"id": i, "score": score, "metadata": metadata.get(i)})
            if self.images is not None and i in self.images:
                results[-1]["image_url"] = f"images/{i}"
        self._timed("search", start)
        return {"model": model, "results": results}

    def _lookup(self, ids: list[int]) -> dict[int, dict]:
        return self.index.lookup(ids)  # the id table is memory-mapped and read-only: threads share it

    async def _stored_vector(self, item: int) -> np.ndarray:
        if not self.index.has_vectors:
            raise HTTPException(409, "the index was built without its vectors (--no-store-vectors): "
                                     "no search by id")
        found, vectors = await asyncio.to_thread(self.index.vectors, [item])
        if not found[0]:
            raise HTTPException(404, f"no item {item} in the index")
        return vectors

    @api.get("/images/{image_id}")
    async def image(self, image_id: int):
        data = self.images.get(image_id) if self.images is not None else None
        if data is None:
            raise HTTPException(404, f"no image {image_id}" + ("" if self.images else " (start with --index-images)"))
        return Response(data, media_type=image_media_type(data), headers={"Cache-Control": "max-age=3600"})
