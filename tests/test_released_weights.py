"""The README's zero-shot example with the real ViT-B-16 weights. Runs only where a
user has downloaded clip_cn_vit-b-16.pt into the cache (never downloads here)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_models
from clip_models.hub import RELEASES, default_cache_dir

CHECKPOINT = default_cache_dir() / RELEASES["ViT-B-16"].filename
PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "pokemon.jpeg"


@pytest.mark.skipif(not CHECKPOINT.is_file() or not PHOTO.is_file(), reason="released ViT-B-16 weights not in the cache")
def test_pokemon_zero_shot_probabilities():
    model, preprocess = clip_models.load("ViT-B-16")
    image = preprocess(Image.open(PHOTO))[None]
    text = clip_models.tokenize(["杰尼龟", "妙蛙种子", "小火龙", "皮卡丘"])
    with torch.no_grad():
        logits_per_image, _ = model.get_similarity(image, text)
    probs = logits_per_image.softmax(dim=-1)[0]
    expected = torch.tensor([1.27e-03, 5.44e-02, 6.80e-04, 9.44e-01])
    torch.testing.assert_close(probs, expected, atol=2e-3, rtol=5e-2)
