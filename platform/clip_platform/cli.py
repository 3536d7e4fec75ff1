"""Command-line plumbing shared by the thin scripts in jobs/."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence


class UserError(ValueError):
    """A mistake in the user's input (flags, paths, data): reported in one line, no traceback."""


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a job's main(); user mistakes exit 2 with one readable line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = sys.argv[0].rsplit("/", 1)[-1]
    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # ValueError covers UserError, clip_models.CheckpointError and config validation.
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
