"""The error clip_models raises for a checkpoint it cannot use: its own module, below both
`checkpoint` (reading files) and `hub` (released names and the cache), which raise it."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a Chinese-CLIP checkpoint."""
