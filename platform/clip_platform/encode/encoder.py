"""The encoder: one checkpoint's towers on one backend, loaded once, turning model inputs into
normalised float32 features. The embed job's actors (`EmbedActor`), the zero-shot classifier,
training's zero-shot validation and the Serve replicas all encode through `ModelEncoder`.

Inputs are what the decode stages make: images as uint8 pixels (normalised here, with the
float32 arithmetic of cn_clip's transform) or as preprocessed floats, texts as 0-padded token
ids cut to the batch's longest. --backend torch runs the model (autocast, oneDNN-packed bf16
linears, torch.compile for CPU image batches); onnxruntime and openvino run the tower's ONNX
graph, exported once per checkpoint and node (clip_platform.deploy).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

import clip_models
from clip_models._torch_compat import inductor_freezing

from .backends import choose_backend, open_tower
from ..model_info import ModelInfo, inspect_model
from .precision import autocast, fast_linears
from ..ray_context import node_id

log = logging.getLogger(__name__)

IMAGE, TEXT = "img", "txt"  # the towers, named as the exported graphs


def normalise(features: torch.Tensor) -> np.ndarray:
    return clip_models.normalize_features(features.float()).cpu().numpy()


def encode_images(model: clip_models.CLIP, images: np.ndarray, precision: str = "fp32",
                  forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Normalised float32 features [N, D] of images [N, 3, S, S]: uint8 pixels (normalised
    by the model, in float32) or preprocessed floats. `forward` replaces model.encode_image
    (e.g. `compiled_image_forward`)."""
    device = next(model.parameters()).device
    array = np.array(images)  # a copy: Ray's arrays are read-only
    pixels = torch.from_numpy(array if array.dtype == np.uint8 else array.astype(np.float32, copy=False))
    with torch.no_grad(), autocast(precision, device):
        return normalise((forward or model.encode_image)(pixels.to(device)))


def compiled_image_forward(model: clip_models.CLIP, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """model.encode_image through torch.compile for inference: the weights are frozen as
    constants (on CPU, pre-packed for oneDNN: most of the gain) and short batches are padded
    to `batch_size`, so one graph serves the whole corpus. The model must not be trained after.
    None (encode eagerly) when this torch lacks inductor's freezing (a private API, warned once)."""
    freezing = inductor_freezing()
    if freezing is None:
        return None
    compiled = torch.compile(model.encode_image, dynamic=False)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        if n < batch_size:
            pixels = torch.cat([pixels, pixels.new_zeros((batch_size - n, *pixels.shape[1:]))])
        with freezing():  # this graph only (it compiles on the first call)
            return compiled(pixels)[:n]

    return forward


def encode_texts(model: clip_models.CLIP, tokens: np.ndarray, num_tokens: np.ndarray | None = None,
                 precision: str = "fp32") -> np.ndarray:
    """Normalised float32 features [N, D] of token ids [N, L], cut to the longest text of the batch."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(trim_tokens(tokens, num_tokens)).to(device)
    with torch.no_grad(), autocast(precision, device):
        return normalise(model.encode_text(ids))


def trim_tokens(tokens: np.ndarray, num_tokens: np.ndarray | None = None) -> np.ndarray:
    """int64 token ids (a copy: Ray's arrays are read-only) cut to the batch's longest text."""
    width = int(num_tokens.max()) if num_tokens is not None and len(num_tokens) else tokens.shape[1]
    return np.array(np.asarray(tokens)[:, :max(width, 1)], np.int64)


def image_floats(images: np.ndarray) -> np.ndarray:
    """float32 model inputs: uint8 pixels normalised as the model does, floats as they are."""
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return clip_models.normalize_pixels(torch.from_numpy(array.copy())).numpy()
    return np.ascontiguousarray(array, np.float32)


class ModelEncoder:
    """A checkpoint's towers (`towers`: "img", "txt" or both) on `backend`, loaded once:
    `encode_images` and `encode_texts` give normalised float32 features [N, D]."""

    def __init__(self, source: str | ModelInfo, towers: tuple[str, ...] = (IMAGE, TEXT), precision: str = "fp32",
                 backend: str = "torch", threads: int = 0, compile_batch: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.info = source if isinstance(source, ModelInfo) else inspect_model(source)
        self.precision = precision
        # Each tower's backend: `auto` may pick a different one per tower (int8).
        backends = {tower: choose_backend(backend, precision, self.device, tower) for tower in towers}
        self.backend = "+".join(sorted(set(backends.values())))  # what runs, for reports
        self.model, self.forward = None, None
        self.linears: dict[str, contextlib.AbstractContextManager] = {}
        self.graphs = {tower: open_tower(name, self.info, tower, precision, self.device, threads)
                       for tower, name in backends.items() if name != "torch"}
        torch_towers = [tower for tower, name in backends.items() if name == "torch"]
        if torch_towers:
            self.model, _ = clip_models.load(self.info.source, device=self.device)
            # Images only: text batches vary in length (each padded to its longest), which a
            # static graph would recompile for.
            self.forward = compiled_image_forward(self.model, compile_batch) \
                if compile_batch and IMAGE in torch_towers else None
            self.linears = {tower: self._fast_linears(tower) for tower in torch_towers}

    def _fast_linears(self, tower: str):
        if tower == IMAGE and self.forward is not None:
            return contextlib.nullcontext()  # the compiled graph packs its own weights
        return fast_linears(self.model.visual if tower == IMAGE else self.model.bert, self.precision, self.device)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Normalised features of images [N, 3, S, S] (uint8 pixels or preprocessed floats)."""
        return self._finite(self._encode_images(images), IMAGE)

    def encode_texts(self, tokens: np.ndarray, num_tokens: np.ndarray | None = None) -> np.ndarray:
        """Normalised features of 0-padded token ids [N, L], cut to the longest text (`num_tokens`)."""
        if TEXT in self.graphs:
            features = normalise(torch.from_numpy(self.graphs[TEXT](trim_tokens(tokens, num_tokens))))
        else:
            with self.linears[TEXT]:
                features = encode_texts(self.model, tokens, num_tokens, self.precision)
        return self._finite(features, TEXT)

    def _finite(self, features: np.ndarray, tower: str) -> np.ndarray:
        """The features, or RuntimeError where a runtime computed NaN or infinities: a NaN feature
        would scramble every top-k it meets, so it is never written or served."""
        if not np.isfinite(features).all():
            raise RuntimeError(f"the {'image' if tower == IMAGE else 'text'} encoder ({self.backend}, "
                               f"{self.precision}) computed NaN or infinite features for "
                               f"{int((~np.isfinite(features).all(axis=1)).sum())} of {len(features)} inputs")
        return features

    def _encode_images(self, images: np.ndarray) -> np.ndarray:
        if IMAGE in self.graphs:
            return normalise(torch.from_numpy(self.graphs[IMAGE](image_floats(images))))
        try:
            with self.linears[IMAGE]:
                return encode_images(self.model, images, self.precision, self.forward)
        except Exception as error:  # noqa: BLE001 - e.g. a node without a C++ compiler for inductor
            if self.forward is None:
                raise
            log.warning("torch.compile failed on node %s, encoding without it: %s", node_id(), error)
            self.forward = None
            self.linears[IMAGE] = self._fast_linears(IMAGE)
            with self.linears[IMAGE]:
                return encode_images(self.model, images, self.precision)
