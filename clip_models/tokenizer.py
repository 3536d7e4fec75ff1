"""Chinese BERT WordPiece tokenization with cn_clip's exact ids, over the vocabulary
shipped in this package: the `tokenizers` library's BERT WordPiece (what transformers'
BertTokenizer runs, without importing transformers: ~20 ms against ~0.9 s, paid by
every new worker that decodes texts)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).parent  # holds vocab.txt (21128 entries)
DEFAULT_CONTEXT_LENGTH = 52


@lru_cache(maxsize=1)
def wordpiece():
    """The WordPiece tokenizer, configured as BertTokenizer(do_lower_case=True)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    return BertWordPieceTokenizer(str(VOCAB_DIR / "vocab.txt"), clean_text=True, handle_chinese_chars=True,
                                  strip_accents=None, lowercase=True)


@lru_cache(maxsize=1)
def special_ids() -> tuple[int, int]:
    """The ids of [CLS] and [SEP]."""
    return wordpiece().token_to_id("[CLS]"), wordpiece().token_to_id("[SEP]")


def get_tokenizer():
    """transformers' BertTokenizer over the same vocabulary (for Hugging Face exports)."""
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(VOCAB_DIR))


def preprocess_text(text: str) -> str:
    """cn_clip's dataset text normalisation: lowercase, curly double quotes to '"'."""
    return text.lower().replace("“", '"').replace("”", '"')


def token_ids(texts: list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> list[list[int]]:
    """[CLS] + wordpieces[:context_length - 2] + [SEP] per text, unpadded."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    cls, sep = special_ids()
    pieces = [e.ids for e in wordpiece().encode_batch(list(texts), add_special_tokens=False)] if texts else []
    return [[cls, *ids[: context_length - 2], sep] for ids in pieces]


def tokenize(texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
             pad_to_longest: bool = False) -> torch.LongTensor:
    """Token ids [N, context_length], zero padded, identical to cn_clip.tokenize.
    With pad_to_longest, pad only to the longest text in the batch (same features,
    less compute)."""
    if isinstance(texts, str):
        texts = [texts]
    rows = token_ids(texts, context_length)
    width = max((len(r) for r in rows), default=2) if pad_to_longest else context_length
    result = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        result[i, : len(row)] = torch.tensor(row)
    return result
