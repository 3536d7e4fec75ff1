"""Checkpoint formats, architecture inference, export, and bad input."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

import clip_models
from clip_models import checkpoint
from clip_models.config import OFFICIAL_STRUCTS
from cn_clip_ref import cn_clip_model

TEXTS = ["一只猫", "两只狗在草地上"]


def features(model, size=None):
    size = size or model.image_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(clip_models.tokenize(TEXTS))])


def save_cn_clip_layout(sd, path, prefix="module.", optimizer=False):
    payload = {"epoch": 3, "step": 120, "name": "muge_finetune", "state_dict": {prefix + k: v for k, v in sd.items()}}
    if optimizer:
        payload["optimizer"] = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                                "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("name", list(OFFICIAL_STRUCTS))
def test_official_architectures_load_from_cn_clip_layout_without_flags(name, tmp_path):
    # Shapes from a meta-device model; stride-0 fp16 tensors (as the released files are
    # fp16) keep the file tiny while the loader does its real work.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in clip_models.create_model(name).state_dict().items()}
    sd = {k: torch.full((), 0.01, dtype=torch.float16).expand(s) for k, s in shapes.items()}
    path = save_cn_clip_layout(sd, tmp_path / "epoch_latest.pt", optimizer=True)
    model, preprocess = clip_models.load(path)
    assert model.config.struct_name() == OFFICIAL_STRUCTS[name]
    assert model.config == clip_models.config_from_struct(name)
    assert preprocess.image_size == (336 if name == "ViT-L-14-336" else 224)
    assert next(model.parameters()).dtype == torch.float32 and not model.training


@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("optimizer", [False, True])
def test_cn_clip_checkpoint_variants_give_identical_features(tiny_vit, tmp_path, prefix, optimizer):
    path = save_cn_clip_layout(tiny_vit.state_dict(), tmp_path / "ckpt.pt", prefix, optimizer)
    torch.testing.assert_close(features(clip_models.load_model(path)), features(tiny_vit), atol=0, rtol=0)


def test_plain_state_dict_and_safetensors(tiny_rn, tmp_path):
    from safetensors.torch import save_file

    torch.save(tiny_rn.state_dict(), tmp_path / "plain.pt")
    save_file(tiny_rn.state_dict(), tmp_path / "weights.safetensors")
    for path in (tmp_path / "plain.pt", tmp_path / "weights.safetensors"):
        model = clip_models.load_model(path)
        assert model.config == tiny_rn.config
        torch.testing.assert_close(features(model), features(tiny_rn), atol=0, rtol=0)


def test_own_format_round_trip_keeps_config(tiny_vit, tmp_path):
    path = clip_models.save_checkpoint(tiny_vit, tmp_path / "model.pt", epoch=7)
    model = clip_models.load_model(path)
    assert model.config == tiny_vit.config
    torch.testing.assert_close(features(model), features(tiny_vit), atol=0, rtol=0)
    assert torch.load(path, weights_only=True)["epoch"] == 7


def test_state_dicts_are_written_and_read_back_with_their_training_entries(tiny_vit, tmp_path):
    state = tiny_vit.state_dict()
    with pytest.raises(TypeError, match="config"):
        clip_models.save_checkpoint(state, tmp_path / "no_config.pt")
    ours = clip_models.save_checkpoint(state, tmp_path / "ours.pt", config=tiny_vit.config)
    assert clip_models.read_checkpoint(ours)[1] == tiny_vit.config
    cn = clip_models.export_cn_clip(state, tmp_path / "cn.pt", epoch=2, step=30, optimizer={"state": {}},
                                    data_position={"epoch": 1, "step_in_epoch": 5})
    meta = {}
    read, _, kind = clip_models.read_checkpoint(cn, meta=meta)
    assert kind == "cn_clip checkpoint" and read.keys() == state.keys()
    assert meta == {"epoch": 2, "step": 30, "name": "export", "optimizer": {"state": {}},
                    "data_position": {"epoch": 1, "step_in_epoch": 5}}


@pytest.mark.parametrize("zipfile", [True, False])
def test_mapped_read_gives_the_same_weights_and_config(tiny_vit, tmp_path, zipfile):
    path = tmp_path / "model.pt"
    state = {"format": checkpoint.FORMAT, "version": 1, "config": tiny_vit.config.to_dict(),
             "state_dict": tiny_vit.state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=zipfile)  # legacy files are read whole
    mapped, config, _ = clip_models.read_checkpoint(path, mmap=True)
    read, _, _ = clip_models.read_checkpoint(path)
    assert config == tiny_vit.config and mapped.keys() == read.keys()
    for key, tensor in read.items():
        torch.testing.assert_close(mapped[key], tensor, atol=0, rtol=0)


def test_loading_builds_the_model_without_random_init_work(tiny_vit, tmp_path):
    """The model is built on the meta device and takes the checkpoint's tensors; no
    random draw there may pull in torch's reference ops (torch._dynamo, ~1.5 s)."""
    path = clip_models.save_checkpoint(tiny_vit, tmp_path / "model.pt")
    code = ("import sys, clip_models; model = clip_models.load_model(sys.argv[1]); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'; print(model.config.struct_name())")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == tiny_vit.config.struct_name()


def test_flash_attention_layout_is_converted(tiny_vit, tmp_path):
    """cn_clip --use-flash-attention checkpoints store fused Wqkv weights."""
    sd = {}
    for key, value in tiny_vit.state_dict().items():
        if ".attn.in_proj_" in key:
            key = key.replace(".attn.in_proj_", ".attn.Wqkv.")
        sd[key] = value
    for i in range(tiny_vit.config.text.num_layers):
        p = f"bert.encoder.layer.{i}.attention."
        for kind in ("weight", "bias"):
            sd[p + f"self.Wqkv.{kind}"] = torch.cat([sd.pop(p + f"self.{n}.{kind}") for n in ("query", "key", "value")])
            sd[p + f"self.out_proj.{kind}"] = sd.pop(p + f"output.dense.{kind}")
    path = save_cn_clip_layout(sd, tmp_path / "flash.pt")
    torch.testing.assert_close(features(clip_models.load_model(path)), features(tiny_vit), atol=0, rtol=0)


def test_hf_directory_safetensors_and_bin(tiny_vit, tmp_path):
    from transformers import ChineseCLIPModel

    out = clip_models.export_hf(tiny_vit, tmp_path / "hf")
    hf_model = ChineseCLIPModel.from_pretrained(out).eval()  # reloadable by transformers itself
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32)
        theirs = hf_model.get_image_features(pixel_values=images)
        theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output
        assert (theirs - tiny_vit.encode_image(images)).abs().max() <= 1e-5
    model, preprocess = clip_models.load(out)
    torch.testing.assert_close(features(model), features(tiny_vit), atol=0, rtol=0)
    assert preprocess.image_size == 32

    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((out / "config.json").read_text())
    torch.save(hf_model.state_dict(), bin_dir / "pytorch_model.bin")
    torch.testing.assert_close(features(clip_models.load_model(bin_dir)), features(tiny_vit), atol=0, rtol=0)


def test_cn_clip_export_loads_in_cn_clip(tiny_rn, tmp_path):
    path = clip_models.export_cn_clip(tiny_rn, tmp_path / "epoch1.pt", epoch=1, step=10)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and all(k.startswith("module.") for k in checkpoint["state_dict"])
    reference = cn_clip_model(tiny_rn.config)
    # As cn_clip's create_model does: strip "module." and load strictly.
    reference.load_state_dict({k[len("module."):]: v for k, v in checkpoint["state_dict"].items()})
    torch.testing.assert_close(features(reference.eval(), tiny_rn.image_size), features(tiny_rn), atol=1e-5, rtol=0)


def test_rn50_has_no_hf_export(tiny_rn, tmp_path):
    with pytest.raises(ValueError, match="no Hugging Face"):
        clip_models.export_hf(tiny_rn, tmp_path / "hf")


# ---------------------------------------------------------------- bad input

class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clip_models_pwned",))


def test_bad_inputs_give_one_clear_error(tiny_vit, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with open(tmp_path / "exploit.pt", "wb") as f:
        pickle.dump({"state_dict": _Exploit()}, f)
    torch.save({"epoch": 1, "weights": [1, 2]}, tmp_path / "nodict.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "emptydir").mkdir()
    cases = {
        tmp_path / "missing.pt": "no such file",
        tmp_path / "notes.txt": "not a PyTorch checkpoint",
        tmp_path / "random.pt": "not a PyTorch checkpoint",
        tmp_path / "exploit.pt": "not a PyTorch checkpoint",
        tmp_path / "nodict.pt": "without a 'state_dict'",
        tmp_path / "list.pt": "holds a list",
        tmp_path / "emptydir": "not a Hugging Face model",
    }
    for path, message in cases.items():
        with pytest.raises(clip_models.CheckpointError, match=message):
            clip_models.load_model(path)
    assert not os.path.exists("/tmp/clip_models_pwned")


def test_wrong_shapes_and_missing_keys(tiny_vit, tmp_path):
    sd = dict(tiny_vit.state_dict())
    sd["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(7, 64)
    torch.save(sd, tmp_path / "shapes.pt")
    with pytest.raises(clip_models.CheckpointError, match="size mismatch"):
        clip_models.load_model(tmp_path / "shapes.pt")
    sd = dict(tiny_vit.state_dict())
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "missing_key.pt")
    with pytest.raises(clip_models.CheckpointError, match="visual.proj"):
        clip_models.load_model(tmp_path / "missing_key.pt")


def test_unknown_name_lists_available_models():
    with pytest.raises(clip_models.CheckpointError, match="ViT-B-16"):
        clip_models.load("ViT-Q-99")
    assert clip_models.available_models()[:5] == ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"]
    assert {"QA-CLIP-RN50", "QA-CLIP-ViT-B-16", "QA-CLIP-ViT-L-14"} <= set(clip_models.available_models())
    assert clip_models.load_from_name is clip_models.load


def test_other_hf_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(clip_models.CheckpointError, match="'bert'"):
        clip_models.load_model(tmp_path)
