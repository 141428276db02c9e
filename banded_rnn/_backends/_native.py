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

CACHES_ENV = "BANDED_RNN_CACHES"
"""Environment variable: the cache sizes the kernel's blocking plans with,
instead of those the CPU reports, e.g. ``l1d=32K,l2=512K,l3=32M`` (any of the
three; K, M or G, or bytes): to run another CPU's plan (results do not depend
on it)."""

_CACHE_LEVELS = ("l1d", "l2", "l3")
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
        isa, threads, caches = _settings_from_environment()
        for name, capsule in _lstm_cpu.targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        if isa is not None:
            _lstm_cpu.set_isa(isa)
        if threads is not None:
            _lstm_cpu.set_threads(threads)
        if caches is not None:
            _lstm_cpu.set_caches(*(caches[level] for level in _CACHE_LEVELS))
        _registered = True


def _settings_from_environment() -> tuple[str | None, int | None, dict[str, int] | None]:
    """:data:`ISA_ENV`, :data:`THREADS_ENV` and :data:`CACHES_ENV`, checked
    (None where unset)."""
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
    caches = os.environ.get(CACHES_ENV) or None
    if caches is not None:
        caches = parse_cache_sizes(caches, CACHES_ENV)
    return isa, threads, caches


def parse_cache_sizes(text: str, name: str) -> dict[str, int]:
    """``"l1d=32K,l2=512K,l3=32M"`` as ``{"l1d": 32768, ...}``: the levels
    given take their sizes (``K``, ``M``, ``G`` or bytes), the others those
    the CPU reports; ``ValueError`` naming ``name`` otherwise.

    >>> parse_cache_sizes("l2=512K", "caches")["l2"]
    524288
    """
    if not available():
        raise RuntimeError(f"the native CPU kernel is not built: {_IMPORT_ERROR}")
    sizes = dict(_lstm_cpu.detected_caches())  # no registration: _register() calls this
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for item in text.split(","):
        level, _, size = item.strip().partition("=")
        scale = units.get(size[-1:].upper(), 1)
        digits = size[:-1] if scale > 1 else size
        if level not in _CACHE_LEVELS or not digits.isdigit():
            raise ValueError(
                f"{name}: expected level=size items, levels {_CACHE_LEVELS}, sizes like "
                f"48K, 2M or 524288; received {text!r}"
            )
        sizes[level] = int(digits) * scale
    return sizes


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


def set_cache_sizes(sizes: dict[str, int] | None) -> None:
    """Plans the kernel's blocking with ``sizes`` (``{"l1d", "l2", "l3"}`` in
    bytes) instead of the CPU's; None returns to the CPU's. Results do not
    depend on it."""
    require()
    if sizes is None:
        _lstm_cpu.set_caches(0, 0, 0)
    else:
        _lstm_cpu.set_caches(*(int(sizes[level]) for level in _CACHE_LEVELS))


def row_block(features: int, units: int, rows: int) -> int:
    """Rows per L2 block the forward kernel takes over ``rows`` rows of one
    thread, for a layer of ``features`` inputs and ``units`` units, with the
    instruction set and cache sizes in use (``rows``: no blocking)."""
    require()
    return _lstm_cpu.row_block(features, units, rows)


def info() -> dict[str, Any]:
    """What the kernel path is in this process: built or not, instruction set,
    register tile, threads, and the cache sizes its blocking plans with.

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
        "tile": f"{_lstm_cpu.row_tile()} rows x {_lstm_cpu.tile_vectors()} vectors",
        "threads": threads if threads else "auto (XLA's intra-op pool)",
        "last_call_threads": _lstm_cpu.last_threads(),
        "caches": _lstm_cpu.caches(),
        "caches_detected": _lstm_cpu.detected_caches(),
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


def tile_vectors() -> int:
    """Vectors per microkernel tile of the instruction set in use: the gates
    one pass of the forward kernel sums (the packed weights' next-to-last axis)."""
    require()
    return _lstm_cpu.tile_vectors()
