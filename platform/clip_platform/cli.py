"""Command-line plumbing shared by the thin scripts in jobs/."""
from __future__ import annotations

import builtins
import io
import logging
import os
import pydoc
import re
import sys
from collections.abc import Callable, Sequence

from . import config

log = logging.getLogger(__name__)


class UserError(ValueError):
    """A mistake in the user's input (flags, paths, data): reported in one line, no traceback."""


# ValueError covers UserError, clip_models.CheckpointError, config validation and bad text encodings.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
# "ValueError: message" or "clip_models.checkpoint.CheckpointError: message" in a remote traceback
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.M)


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a job's main(); user mistakes exit 2 with one readable line on stderr, also when a
    Ray task or actor raised them (the full traceback goes to the log at DEBUG). Anything
    else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = config.program_name()
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        log.debug("the error in full", exc_info=exc)
        print(f"{prog}: error: {message}", file=sys.stderr)
        # Other tasks failed the same way: Ray would log each of their tracebacks as it frees them at exit.
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        sys.exit(2)


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user mistake, found inside Ray's task and actor errors too;
    None when `exc` is something else."""
    ray_error = _ray_error_type()
    if ray_error is not None and isinstance(exc, ray_error):
        cause = getattr(exc, "cause", None)  # a plain task's exception, raised again on the driver
        if isinstance(cause, USER_ERRORS) and not isinstance(cause, ray_error):
            return user_error(cause)
        # Ray Data tasks and actor constructors hand back only the remote traceback's text:
        # its first exception is the root cause.
        for name, message in _EXCEPTION_LINE.findall(str(exc)):
            kind = getattr(builtins, name, None) or pydoc.locate(name)
            if isinstance(kind, type) and issubclass(kind, USER_ERRORS):
                return message.strip()
        return None
    if isinstance(exc, UnicodeDecodeError) and (name := _file_being_read(exc)):
        return f"{name} is not UTF-8 text ({exc.reason}: byte {exc.object[exc.start]:#04x})"
    if isinstance(exc, USER_ERRORS):
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _file_being_read(exc: BaseException) -> str | None:
    """The name of the text file open in the innermost frame that had one when `exc` was
    raised: a decoding error names no file, and every text reader has its file open."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, io.TextIOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return None


def _ray_error_type() -> type | None:
    """ray.exceptions.RayError when Ray was imported (a job that never started Ray is spared importing it)."""
    exceptions = sys.modules.get("ray.exceptions")
    return getattr(exceptions, "RayError", None)
