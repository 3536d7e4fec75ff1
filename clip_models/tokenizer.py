"""Chinese BERT WordPiece tokenization with cn_clip's exact ids, through
transformers' BertTokenizer over the vocabulary shipped in this package."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).parent  # holds vocab.txt (21128 entries)
DEFAULT_CONTEXT_LENGTH = 52


@lru_cache(maxsize=1)
def get_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(VOCAB_DIR))


def preprocess_text(text: str) -> str:
    """cn_clip's dataset text normalisation: lowercase, curly double quotes to '"'."""
    return text.lower().replace("“", '"').replace("”", '"')


def token_ids(texts: list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> list[list[int]]:
    """[CLS] + wordpieces[:context_length - 2] + [SEP] per text, unpadded."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    tok = get_tokenizer()
    pieces = tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [[tok.cls_token_id, *ids[: context_length - 2], tok.sep_token_id] for ids in pieces]


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
