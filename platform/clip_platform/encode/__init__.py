"""The model at inference, one package that none of the jobs owns: the embed job's actors, the
zero-shot job, training's zero-shot validation and the Serve replicas all encode through it.

* `encoder`     `ModelEncoder`: a checkpoint's towers on one backend, loaded once, inputs ->
                normalised float32 features (and the torch helpers it runs on)
* `backends`    --backend: torch, ONNX Runtime or OpenVINO over the cached ONNX graphs, and what
                `auto` picks for a device and precision
* `precision`   --precision: autocast, packed bf16 linears, the int8 graphs
* `classifier`  cn_clip's zero-shot classifier (class embeddings from prompts, probabilities)
* `templates`   the Chinese prompt templates
"""
from .encoder import ModelEncoder, compiled_image_forward, encode_images, encode_texts

__all__ = ["ModelEncoder", "compiled_image_forward", "encode_images", "encode_texts"]
