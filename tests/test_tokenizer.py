"""Tokenizer: cn_clip's ids on hard cases (golden values taken from cn_clip 1.6.0's
FullTokenizer, and checked against it live when it is installed)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import clip_models
from cn_clip_ref import import_cn_clip

GOLDEN = {
    "一只可爱的小猫咪": [671, 1372, 1377, 4263, 4638, 2207, 4344, 1488],
    "iPhone 15 Pro Max 256GB": [8210, 8115, 8376, 8621, 9745, 9673],
    "ＡＢＣ全角１２３": [8051, 12641, 10675, 1059, 6235, 10351, 9089],
    "我爱😀北京🚀": [2769, 4263, 100, 1266, 776, 100],
    "Café naïve RÉSUMÉ": [8377, 11469, 8857, 8847, 11442, 8505],
    "𠀀罕见字": [100, 5383, 6224, 2099],
    "": [],
    "  ": [],
    "don't stop-believing!!!": [9524, 112, 162, 11467, 118, 8815, 10158, 10369, 106, 106, 106],
    "3.14159 and 1,000,000": [124, 119, 9554, 9632, 8256, 122, 117, 8241, 117, 8241],
}
CLS, SEP = 101, 102
HARD_CASES = [*GOLDEN, "“引号”和「括号」", "tab\there\nnewline", "x" * 100, "中" * 100, "ǅ ß İ ﬁ", "\u200b零宽\u3000空格"]


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids(text):
    ids = clip_models.tokenize(text)[0]
    expected = [CLS, *GOLDEN[text], SEP]
    assert ids[: len(expected)].tolist() == expected
    assert ids[len(expected):].eq(0).all()


def test_matches_cn_clip_tokenize_including_truncation():
    clip = import_cn_clip()
    reference = clip._tokenizer
    for context_length in (52, 8):
        ours = clip_models.tokenize(HARD_CASES, context_length=context_length)
        for row, text in zip(ours, HARD_CASES):
            pieces = reference.convert_tokens_to_ids(reference.tokenize(text))[: context_length - 2]
            expected = torch.zeros(context_length, dtype=torch.long)
            expected[: len(pieces) + 2] = torch.tensor([CLS, *pieces, SEP])
            assert torch.equal(row, expected), text


def test_over_long_text_is_truncated_to_context_length():
    ids = clip_models.tokenize("中" * 100, context_length=52)
    assert ids.shape == (1, 52) and ids[0, 0] == CLS and ids[0, -1] == SEP and (ids[0, 1:-1] == 704).all()


def test_pad_to_longest_gives_same_features(tiny_vit):
    texts = ["短", "一段稍微长一些的中文描述文本"]
    full = clip_models.tokenize(texts)
    short = clip_models.tokenize(texts, pad_to_longest=True)
    assert short.shape[1] == 16 and torch.equal(full[:, :16], short)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit.encode_text(full), tiny_vit.encode_text(short), atol=1e-5, rtol=0)


def test_preprocess_text_as_cn_clip_datasets():
    assert clip_models.preprocess_text("“Hello”世界") == '"hello"世界'


def test_context_length_too_small_is_an_error():
    with pytest.raises(ValueError, match="context_length"):
        clip_models.tokenize("你好", context_length=1)


def test_tokenizing_needs_no_transformers_import():
    """Decode workers tokenize texts: the WordPiece comes from `tokenizers` (~20 ms to import),
    not transformers (~0.9 s per new worker)."""
    code = ("import sys, clip_models; ids = clip_models.tokenize('一只猫')[0, :5].tolist(); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print(ids)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str([CLS, 671, 1372, 4344, SEP])


def test_hugging_face_tokenizer_gives_the_same_ids():
    from clip_models.tokenizer import get_tokenizer, token_ids

    hf = get_tokenizer()
    expected = [[CLS, *ids, SEP] for ids in hf(HARD_CASES, add_special_tokens=False)["input_ids"]]
    assert token_ids(HARD_CASES, 10**6) == expected
