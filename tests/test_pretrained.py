"""Training from separate OpenAI-CLIP vision and Chinese-BERT text weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import clip_models
from clip_models.pretrained import init_from_pretrained


class OpenAIStyleCLIP(nn.Module):
    """OpenAI CLIP's state-dict layout for the parts we read: visual.*, logit_scale,
    plus its own text transformer (ignored by the loader)."""

    def __init__(self, source: clip_models.CLIP):
        super().__init__()
        self.visual = source.visual
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.token_embedding = nn.Embedding(49408, 8)
        self.ln_final = nn.LayerNorm(8)

    def forward(self, x):
        return self.visual(x)


def tiny_hf_bert(tmp_path, target: clip_models.CLIP):
    from transformers import BertConfig, BertModel

    t = target.config.text
    bert = BertModel(BertConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                                num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
                                max_position_embeddings=t.max_position_embeddings))
    bert.save_pretrained(tmp_path / "bert")
    return bert


@pytest.mark.parametrize("layout", ["state_dict", "torchscript"])
def test_towers_equal_their_sources(tmp_path, layout):
    source = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")
    openai = OpenAIStyleCLIP(source).eval()
    if layout == "torchscript":
        torch.jit.trace(openai, torch.randn(1, 3, 32, 32)).save(str(tmp_path / "ViT-Tiny-OpenAI.pth"))
    else:
        torch.save(openai.state_dict(), tmp_path / "ViT-Tiny-OpenAI.pth")
    bert = tiny_hf_bert(tmp_path, source)
    model = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")
    report = init_from_pretrained(model, str(tmp_path / "ViT-Tiny-OpenAI.pth"), str(tmp_path / "bert"))
    for key, value in openai.state_dict().items():
        if key.startswith("visual.") or key == "logit_scale":
            assert torch.equal(model.state_dict()[key], value), key
    for key, value in bert.state_dict().items():
        if key.startswith(("embeddings.", "encoder.")):
            assert torch.equal(model.state_dict()["bert." + key], value), key
    assert report.new == ["text_projection"]  # the projections start fresh (visual.proj comes with CLIP)
    assert not report.resized


def test_positional_embedding_is_resized_for_another_resolution(tmp_path):
    source = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")  # 32 px, patch 8: 4x4 grid
    torch.save(OpenAIStyleCLIP(source).state_dict(), tmp_path / "clip.pt")
    bigger = clip_models.CLIP(clip_models.CLIPConfig(32, clip_models.VisionConfig(48, 2, 64, 8, head_width=32),
                                                     source.config.text))
    report = init_from_pretrained(bigger, str(tmp_path / "clip.pt"))
    assert report.resized == ["visual.positional_embedding"]
    assert bigger.visual.positional_embedding.shape == (37, 64)
    assert torch.equal(bigger.visual.positional_embedding[0], source.visual.positional_embedding[0])


def test_mismatched_architecture_is_refused(tmp_path):
    source = clip_models.create_model("ViT-Tiny@BERT-Tiny-chinese")
    torch.save(OpenAIStyleCLIP(source).state_dict(), tmp_path / "clip.pt")
    other = clip_models.create_model("RN-Tiny@BERT-Tiny-chinese")
    with pytest.raises(clip_models.CheckpointError, match="do not fit"):
        init_from_pretrained(other, str(tmp_path / "clip.pt"))
    with pytest.raises(clip_models.CheckpointError, match="no BERT weights"):
        init_from_pretrained(other, bert_path=str(tmp_path / "missing"))
