"""The errors that end a run with one clear line (no traceback), and the words for their causes."""

from __future__ import annotations

import contextlib
import errno
import socket

from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

# The causes a user acts on, in their words; any other OSError keeps the system's text.
CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
          errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


class RunError(Exception):
    """A problem that ends the run with one clear line; train.py prints it after `error:`."""


class DataError(Exception):
    """A data problem worth one line to the user (file, line, what is wrong)."""


class WriteError(RunError):
    """A file of the run could not be written; train.py adds the last good checkpoint to the line."""

    def __init__(self, path, exc: BaseException, step: int | None = None):
        when = f" at step {step}" if step is not None else ""
        super().__init__(f"{path} could not be written{when}: {cause(exc)}")


def chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cause(exc: BaseException) -> str:
    """One line saying why a write failed: "disk full (...)" when it was, the error's first line otherwise."""
    for inner in chain(exc):
        if isinstance(inner, OSError) and inner.errno in CAUSES:
            return f"{CAUSES[inner.errno]} ({inner.strerror})"
    return first_line(exc)


def hub_unreachable(exc: BaseException) -> bool:
    """Whether loading failed because the Hugging Face hub could not be reached (offline, no network)."""
    for inner in chain(exc):
        if isinstance(inner, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError,
                              socket.gaierror)):
            return True
        if type(inner).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "ProxyError"):  # httpx, requests
            return True
    return False


@contextlib.contextmanager
def loading(key: str, name: str):
    """Loading `name` (config key `key`) ends the run with one line when it fails: a hub that cannot be
    reached, or whatever the loader raised (its first line)."""
    try:
        yield
    except (RunError, DataError):
        raise
    except Exception as exc:
        if hub_unreachable(exc):
            raise RunError(f"{key}: cannot reach the hub for {name}; give a local path") from None
        raise RunError(f"{key}: {name} cannot be loaded ({type(exc).__name__}: {first_line(exc)})") from None
