"""Preprocessing: cn_clip's inference transform and the training augmentation."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import clip_models
from clip_models.transforms import MEAN, STD, TrainTransform

SHARED_IMAGE = "/work/shared/data/pokemon.jpeg"


def checkerboard(mode="RGB", size=(50, 30)):
    array = (np.indices(size[::-1]).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([array, 255 - array, array // 2], -1)).convert(mode)


def reference_transform(image, size):
    """cn_clip's Compose written out: PIL bicubic resize, RGB, /255, (x - mean) / std."""
    array = np.asarray(image.resize((size, size), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy((array - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_image_transform_is_square_bicubic_resize_without_crop(mode):
    image = checkerboard(mode)
    out = clip_models.image_transform(24)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_transform(image, 24), atol=1e-6, rtol=0)


def test_preprocess_of_the_readme_photo_has_the_model_resolution():
    try:
        image = Image.open(SHARED_IMAGE)
    except FileNotFoundError:
        image = checkerboard(size=(224, 224))
    out = clip_models.image_transform(224)(image)
    assert out.shape == (3, 224, 224)
    assert torch.isfinite(out).all() and -2 < out.min() < out.max() < 3


def test_train_transform_is_random_but_well_formed():
    augment = clip_models.train_transform(32, use_augment=True)
    assert isinstance(augment, TrainTransform)
    image = checkerboard(size=(64, 48))
    torch.manual_seed(0)
    outputs = [augment(image) for _ in range(6)]
    assert all(o.shape == (3, 32, 32) and torch.isfinite(o).all() for o in outputs)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for o in outputs:
        assert (o.amin((1, 2)) >= low - 1e-5).all() and (o.amax((1, 2)) <= high + 1e-5).all()


def test_train_transform_without_augment_is_the_inference_transform():
    image = checkerboard()
    plain = clip_models.train_transform(24, use_augment=False)
    torch.testing.assert_close(plain(image), clip_models.image_transform(24)(image))


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_pixels_normalised_later_equal_the_full_transform(mode, tiny_vit):
    image = checkerboard(mode)
    pixels = clip_models.image_transform(24, pixels=True)(image)
    assert pixels.shape == (3, 24, 24) and pixels.dtype == torch.uint8
    assert torch.equal(clip_models.normalize_pixels(pixels), clip_models.image_transform(24)(image))
    full = clip_models.image_transform(tiny_vit.image_size)
    raw = clip_models.image_transform(tiny_vit.image_size, pixels=True)
    with torch.no_grad():
        assert torch.equal(tiny_vit.encode_image(torch.stack([raw(image)])),
                           tiny_vit.encode_image(torch.stack([full(image)])))


def test_augmented_pixels_are_uint8_and_pickle():
    import pickle

    augment = pickle.loads(pickle.dumps(clip_models.train_transform(32, use_augment=True, pixels=True)))
    out = augment(checkerboard(size=(64, 48)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and out.max() > 0


def test_train_transform_pickles_for_ray_workers():
    import pickle

    augment = clip_models.train_transform(16, use_augment=True)
    augment(checkerboard())
    clone = pickle.loads(pickle.dumps(augment))
    assert clone(checkerboard()).shape == (3, 16, 16)


def jpeg_bytes(size=(40, 30)):
    buffer = io.BytesIO()
    checkerboard(size=size).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_decode_image_rejects_bad_data():
    good = jpeg_bytes()
    assert clip_models.decode_image(good).size == (40, 30)
    for bad in (b"", b"not an image", good[: len(good) // 2]):
        with pytest.raises(ValueError, match="not a readable image"):
            clip_models.decode_image(bad)
    with pytest.raises(ValueError, match="over the limit"):
        clip_models.decode_image(good, max_pixels=100)
