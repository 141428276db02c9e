"""Keeping orbax's noise about a damaged checkpoint off stderr: what it logs while
reading one, and the errors a failed restore leaves behind. :class:`Checkpointer`
reports the damage itself, as a ``UserWarning`` or a ``ValueError``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


@contextlib.contextmanager
def quiet_orbax_logs() -> Iterator[None]:
    """Keeps orbax's warnings about a damaged checkpoint (logged through absl) off
    stderr; the ``UserWarning`` or ``ValueError`` says what was wrong."""
    logger, quiet = logging.getLogger("absl"), _BelowWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def drop_orbax_teardown_errors() -> None:
    """Installs, once, a ``sys.unraisablehook`` and a filter of the ``asyncio`` logger
    that drop the errors left behind by a failed orbax restore, and pass everything
    else on.

    Orbax runs each restore in a new asyncio loop and closes it as soon as one
    tensorstore read fails. The reads still in flight then finish on tensorstore
    threads, whose callbacks into the closed loop raise "Event loop is closed";
    the reading coroutines left unfinished raise when garbage-collected (orbax
    turns their ``GeneratorExit`` into an ``Exception``), and asyncio logs the
    tasks that failed unheard. All of it would reach stderr, seconds later at
    times: so the hook and the filter stay.
    """
    if getattr(sys.unraisablehook, "drops_orbax_teardown_errors", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_orbax_teardown_error(unraisable):
            previous(unraisable)

    hook.drops_orbax_teardown_errors = True
    sys.unraisablehook = hook
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxTeardownLogs) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_OrbaxTeardownLogs())


def _is_orbax_teardown_error(unraisable: Any) -> bool:
    error, trace = unraisable.exc_value, unraisable.exc_traceback
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        # tensorstore's signature: a thread not started by Python calls
        # call_soon_threadsafe straight from C (no Python caller in the trace).
        return (
            trace is not None
            and trace.tb_frame.f_code.co_name == "call_soon_threadsafe"
            and isinstance(threading.current_thread(), threading._DummyThread)
        )
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
    return (
        isinstance(getattr(error, "__cause__", None), GeneratorExit)
        and code is not None
        and _ORBAX in code.co_filename
    )


_ORBAX = f"{os.sep}orbax{os.sep}"
_UNHEARD = (
    "Task exception was never retrieved",
    "Future exception was never retrieved",
    "Task was destroyed but it is pending",
)


class _OrbaxTeardownLogs(logging.Filter):
    """Drops asyncio's reports of orbax's tasks (or of their tensorstore reads) left
    failed or pending when orbax closed its loop."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_UNHEARD):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (_ORBAX in message or "tensorstore" in f"{message} {error}")
