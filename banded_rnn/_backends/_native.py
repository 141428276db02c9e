"""The native CPU kernel (``csrc/``): loading, registration with XLA, settings.

The extension module ``banded_rnn._lstm_cpu`` is compiled at install time
(CMake, through scikit-build-core); if it is missing, :func:`available` is
False, :func:`warn_unavailable` says so once and ``BandedLSTM`` runs the XLA
scan instead. :mod:`._native_layer` calls it; :mod:`._packed` lays out the
weights it reads.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import jax

try:
    from .. import _lstm_cpu
except ImportError as error:  # not built: the scan runs instead
    _lstm_cpu = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

FORWARD = "banded_rnn_lstm_forward"
FORWARD_TRAIN = "banded_rnn_lstm_forward_train"
BACKWARD = "banded_rnn_lstm_backward"

THREADS_ENV = "BANDED_RNN_THREADS"
"""Environment variable: the most threads one kernel call uses (default: as
many as XLA's intra-op pool has, which is one per core)."""

ISA_ENV = "BANDED_RNN_ISA"
"""Environment variable: run the kernel with this instruction set
(``avx512``, ``avx2`` or ``portable``) instead of the fastest the CPU has."""

_lock = threading.Lock()
_registered = False
_warned = False


def available() -> bool:
    """Whether the compiled kernel can run in this process (it is registered on first use)."""
    return _lstm_cpu is not None


def _register() -> None:
    """Registers the FFI targets with XLA once, and applies the environment settings."""
    global _registered
    with _lock:
        if _registered:
            return
        isa, threads = _settings_from_environment()
        for name, capsule in _lstm_cpu.targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        if isa is not None:
            _lstm_cpu.set_isa(isa)
        if threads is not None:
            _lstm_cpu.set_threads(threads)
        _registered = True


def _settings_from_environment() -> tuple[str | None, int | None]:
    """:data:`ISA_ENV` and :data:`THREADS_ENV`, checked (None where unset)."""
    isa = os.environ.get(ISA_ENV) or None
    if isa is not None and isa not in _lstm_cpu.isas():
        raise ValueError(
            f"{ISA_ENV}: expected one of {_lstm_cpu.isas()} (what this CPU can run); "
            f"received {isa!r}"
        )
    threads = os.environ.get(THREADS_ENV) or None
    if threads is not None:
        if not threads.isdigit():
            raise ValueError(f"{THREADS_ENV}: expected an integer >= 0; received {threads!r}")
        threads = int(threads)
    return isa, threads


def warn_unavailable() -> None:
    """Warns, once per process, that the kernel is missing and the scan runs instead."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"banded_rnn: the native CPU kernel is not built ({_IMPORT_ERROR}); BandedLSTM "
            "runs the XLA scan instead (reinstall with `pip install -e .` to build it)",
            RuntimeWarning,
            stacklevel=3,
        )


def set_threads(threads: int) -> None:
    """Sets the most threads one kernel call uses; 0 restores the default (one
    per thread of XLA's intra-op pool). Results do not depend on it.

    >>> set_threads(1)                                 # e.g. beside other busy processes
    >>> info()["threads"]
    1
    >>> set_threads(0)
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads: expected an integer >= 0; received {threads!r}")
    require()
    _lstm_cpu.set_threads(threads)


def set_isa(name: str) -> None:
    """Runs the kernel with the instruction set ``name`` (one of :func:`isas`)."""
    require()
    if name not in _lstm_cpu.isas():
        raise ValueError(f"isa: expected one of {_lstm_cpu.isas()}; received {name!r}")
    _lstm_cpu.set_isa(name)


def isas() -> tuple[str, ...]:
    """The instruction sets this CPU can run the kernel with, fastest first."""
    return _lstm_cpu.isas() if available() else ()


def calls() -> int:
    """Forward calls the kernel has run in this process (0 if it is not built)."""
    return _lstm_cpu.calls() if available() else 0


def info() -> dict[str, Any]:
    """What the kernel path is in this process: built or not, instruction set, threads.

    >>> details = info()                               # also: python -m banded_rnn info
    >>> details["kernel"], details["isa"] in details["isas"]
    ('built', True)
    """
    if not available():
        return {"kernel": "not built", "error": str(_IMPORT_ERROR)}
    _register()
    threads = _lstm_cpu.threads()
    return {
        "kernel": "built",
        "isa": _lstm_cpu.isa(),
        "isas": _lstm_cpu.isas(),
        "vector_floats": _lstm_cpu.width(),
        "threads": threads if threads else "auto (XLA's intra-op pool)",
        "last_call_threads": _lstm_cpu.last_threads(),
    }


def require() -> None:
    """Raises ``RuntimeError`` unless the kernel is built; registers it on first use."""
    if not available():
        raise RuntimeError(f"the native CPU kernel is not built: {_IMPORT_ERROR}")
    _register()


def width() -> int:
    """Floats per vector of the instruction set in use (the packed weights' last axis)."""
    require()
    return _lstm_cpu.width()
