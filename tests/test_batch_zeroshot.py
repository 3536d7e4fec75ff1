"""Zero-shot classification: a tiny random model, a generated image folder, the
shared local Ray; the JSON has cn_clip's ELEVATER shape and its numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clip_models
from clip_platform import cli
from clip_platform.encode.templates import ZH_TEMPLATES, fill, load_templates
from clip_platform.batch.zeroshot import ImageClassifier, ZeroShotConfig, zeroshot
from clip_platform.encode.classifier import class_embeddings, decode_images
from clip_platform.data import zeroshot_images
from helpers import load_job

CLASSES = ["红色", "绿色", "蓝色"]
COLOURS = [(220, 30, 30), (30, 200, 40), (20, 40, 230)]


@pytest.fixture
def dataset(tmp_path, tiny_vit):
    """datasets/colours/{label_cn.txt, test/00X/*.png} with 2 images per class, one broken file, and a checkpoint."""
    root = tmp_path / "colours"
    for label, colour in enumerate(COLOURS):
        folder = root / "test" / f"{label:03d}"
        folder.mkdir(parents=True)
        for i in range(2):
            shade = tuple(max(0, c - 40 * i) for c in colour)
            Image.new("RGB", (20 + 8 * i, 24), shade).save(folder / f"img{i}.png")
        (folder / "notes.txt").write_text("not an image, not listed")
    (root / "test" / "001" / "broken.jpg").write_bytes(b"not really a jpeg")
    (root / "label_cn.txt").write_text("\n".join(CLASSES) + "\n\n", encoding="utf-8")
    checkpoint = clip_models.save_checkpoint(tiny_vit, tmp_path / "tiny.pt")
    return root, checkpoint, tiny_vit


def test_zero_shot_json_has_the_elevater_shape_and_cn_clip_numbers(ray_local, dataset, tmp_path):
    root, checkpoint, model = dataset
    config = ZeroShotConfig(datapath=str(root / "test"), label_file=str(root / "label_cn.txt"),
                            save_dir=str(tmp_path / "out"), dataset="colours", resume=str(checkpoint),
                            img_batch_size=2, num_workers=1)
    result = zeroshot(config)
    payload = json.loads((tmp_path / "out" / "colours.json").read_text())
    assert list(payload) == ["model_name", "dataset_name", "num_trainable_params", "num_params",
                             "num_visual_params", "num_backbone_params", "n_shot", "rnd_seeds", "predictions"]
    assert payload["model_name"] == "CN-CLIP-ViT-Tiny" and payload["dataset_name"] == "colours"
    assert payload["num_params"] == sum(p.numel() for p in model.parameters()) == payload["num_backbone_params"]
    assert payload["num_visual_params"] == sum(p.numel() for p in model.visual.parameters())
    predictions = np.array(payload["predictions"])
    assert predictions.shape == (1, 6, 3)
    assert result.num_images == 6 and len(result.skipped) == 1 and result.skipped[0].endswith("broken.jpg")

    # The same numbers computed directly: cn_clip's classifier and softmax(100 * cosine).
    preprocess = clip_models.image_transform(model.image_size)
    records = [(i.path, int(i.path.split("/")[-2])) for i in zeroshot_images(root / "test")[2]
               if not i.path.endswith("broken.jpg")]
    with torch.no_grad():
        weights = class_embeddings(model, CLASSES, ZH_TEMPLATES)
        images = torch.stack([preprocess(Image.open(path)) for path, _ in records])
        features = model.encode_image(images)
        expected = (100.0 * (features / features.norm(dim=-1, keepdim=True)) @ weights).softmax(dim=-1)
    np.testing.assert_allclose(predictions[0], expected.numpy(), atol=2e-6)
    labels = np.array([label for _, label in records])
    assert result.top1 == float((expected.argmax(1).numpy() == labels).mean()) and result.top5 == 1.0


def test_mapper_stages_work_without_ray_and_bf16_stays_close(dataset):
    root, checkpoint, model = dataset
    records = [(i.path, int(i.path.split("/")[-2])) for i in zeroshot_images(root / "test", 3)[2]]
    batch = {"image_id": np.array([p for p, _ in records]), "label": np.array([label for _, label in records]),
             "image": np.array([open(p, "rb").read() for p, _ in records], dtype=object)}
    decoded = decode_images(batch, model.image_size)
    assert decoded["ok"].tolist() == [not p.endswith("broken.jpg") for p, _ in records]
    assert "not a readable image" in decoded["error"][~decoded["ok"]][0]
    classifier = class_embeddings(model, CLASSES, ZH_TEMPLATES[:3]).numpy()
    fp32 = ImageClassifier(str(checkpoint), classifier, "fp32")(decoded)
    bf16 = ImageClassifier(str(checkpoint), classifier, "bf16")(decoded)
    assert fp32["probs"].shape == (7, 3) and not fp32["probs"][~decoded["ok"]].any()
    np.testing.assert_allclose(bf16["probs"], fp32["probs"], atol=0.05)


def test_class_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings(tiny_vit):
    weights = class_embeddings(tiny_vit, CLASSES, ZH_TEMPLATES[:5], context_length=52)
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            # cn_clip's way: every prompt padded to the full context length.
            tokens = clip_models.tokenize([clip_models.preprocess_text(fill(t, name)) for t in ZH_TEMPLATES[:5]], 52)
            emb = tiny_vit.encode_text(tokens)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            torch.testing.assert_close(weights[:, c], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_num_params_counts_what_cn_clip_counts(tiny_vit):
    from cn_clip_ref import cn_clip_model

    reference = cn_clip_model(tiny_vit.config)
    assert sum(p.numel() for p in tiny_vit.parameters()) == sum(p.numel() for p in reference.parameters())


def test_templates_are_chinese_prompts_with_a_slot(tmp_path):
    assert len(ZH_TEMPLATES) >= 20 and len(set(ZH_TEMPLATES)) == len(ZH_TEMPLATES)
    assert all("{}" in t for t in ZH_TEMPLATES)
    assert fill("一张{}的照片", "{猫}") == "一张{猫}的照片"
    (tmp_path / "t.txt").write_text("{}的图片\n\n一张{}的画\n", encoding="utf-8")
    assert load_templates(str(tmp_path / "t.txt")) == ("{}的图片", "一张{}的画")
    (tmp_path / "bad.txt").write_text("没有占位符\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1.*has no {}"):
        load_templates(str(tmp_path / "bad.txt"))


@pytest.mark.parametrize("break_it, message", [
    (lambda root: (root / "label_cn.txt").unlink(), "label_cn.txt does not exist"),
    (lambda root: (root / "test" / "cats").mkdir(), "is not named by a label id"),
    (lambda root: (root / "test" / "007").mkdir(), "is label 7, but the label file has 3 classes"),
    (lambda root: (root / "label_cn.txt").write_text("红色\n\n蓝色\n", encoding="utf-8"), "line 2 is blank"),
])
def test_zeroshot_job_user_errors_are_one_line(dataset, tmp_path, capsys, break_it, message):
    root, checkpoint, _ = dataset
    break_it(root)
    argv = ["--datapath", str(root / "test"), "--label-file", str(root / "label_cn.txt"),
            "--resume", str(checkpoint), "--save-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_job("zeroshot").main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_zeroshot_config_needs_a_model():
    with pytest.raises(ValueError, match="--resume is required"):
        ZeroShotConfig(datapath="d", label_file="l")
