"""The HTTP API's request bodies and how replies encode vectors.

Everything a request can get wrong on its own (types, empty texts, bad base64, a template
without `{}`, asking for two queries at once) is checked here and answered 422 by FastAPI
before a route runs. Limits that depend on the served configuration (items per request,
text and image sizes) are the Gateway's, answered 413."""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import UploadFile
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from clip_platform.encode.templates import PLACEHOLDER

from .images import decode_base64_image, is_data_uri

FLOAT_DECIMALS = 8  # embeddings in JSON: 8 decimals of a unit vector (error <= 5e-9), half the bytes of repr
MAX_TEMPLATES = 64  # /classify templates per request (the built-in Chinese set has 28)


def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("texts must be non-empty strings")
    return text


def _template(template: str) -> str:
    if PLACEHOLDER not in template:
        raise ValueError(f"every template needs a {PLACEHOLDER} for the label")
    return template


Text = Annotated[str, AfterValidator(_non_blank)]
Template = Annotated[str, AfterValidator(_template)]
# Decoded while the body is validated: a route sees the image's bytes.
ImageData = Annotated[str, AfterValidator(decode_base64_image), Field(description="base64 or data URI")]
ModelName = Annotated[str | None, Field(description="a name from GET /models; default the first")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class TextsRequest(Body):
    texts: list[Text] = Field(..., min_length=1, examples=[["一只橘色的猫", "北京的夜景"]])
    model: ModelName = None


class ImagesRequest(Body):
    images: list[ImageData] = Field(..., min_length=1, description="base64 or data-URI encoded images")
    model: ModelName = None


class ImagesUpload(Body):
    """A multipart/form-data /embed/image: files under `images` (or `image`)."""
    images: list[UploadFile] = Field(..., min_length=1)
    model: ModelName = None


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; fields OpenAI's clients add (user, dimensions) are ignored."""
    input: Text | list[Text] = Field(..., description="texts; images as data URIs (data:image/...;base64,...)")
    model: ModelName = None
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI's API")
    _images: dict[int, bytes] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _decode_images(self):
        if not self.inputs:
            raise ValueError("input is empty")
        self._images = {i: decode_base64_image(x) for i, x in enumerate(self.inputs) if is_data_uri(x)}
        return self

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input

    @property
    def images(self) -> dict[int, bytes]:
        """The decoded images by position in `input`."""
        return self._images


class ClassifyRequest(Body):
    image: ImageData
    labels: list[Text] = Field(..., min_length=1, examples=[["杰尼龟", "妙蛙种子", "小火龙", "皮卡丘"]])
    templates: list[Template] | None = Field(
        None, min_length=1, max_length=MAX_TEMPLATES,
        description="prompt templates, {} standing for the label; default: the zero-shot job's Chinese set")
    model: ModelName = None


class SearchRequest(Body):
    text: Text | None = None
    image: ImageData | None = None
    id: int | None = Field(None, validation_alias=AliasChoices("id", "image_id", "text_id"),
                           description="more like this: the item of the index with this id (image_id or text_id)")
    top_k: int = Field(10, ge=1, le=100)
    model: ModelName = Field(None, description="default: the model whose features the index holds")

    @model_validator(mode="after")
    def _one_query(self):
        if sum(x is not None for x in (self.text, self.image, self.id)) != 1:
            raise ValueError("give exactly one of 'text', 'image' or 'image_id'")
        return self


def floats(vectors: np.ndarray) -> list:
    """Rows as JSON-ready lists of short floats (json.dumps writes the shortest repr)."""
    return np.round(vectors.astype(np.float64), FLOAT_DECIMALS).tolist()
