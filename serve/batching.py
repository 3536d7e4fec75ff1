"""Splitting requests into model batches and sizing @serve.batch batches."""
from __future__ import annotations


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def num_items(requests: list[list]) -> int:
    """@serve.batch size of a batch of requests that each carry a list of items."""
    return sum(len(r) for r in requests)
