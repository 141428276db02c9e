"""Counting XLA compilations, charged to whoever is running when they happen."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import jax

# JAX fires this monitoring event once per backend compilation, in the thread
# that compiles.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts the XLA compilations that happen inside ``with counter:`` blocks.

    Eager operations count too. Blocks nest: a compilation is charged to the
    innermost active counter of the thread that compiles. JAX's monitoring
    listener is registered while at least one counter exists in the process,
    and removed when the last one is garbage-collected, so entering a block
    costs a list append (streams enter one on every call).

    >>> import jax.numpy as jnp
    >>> x = jnp.ones(7)
    >>> counter = CompileCounter()
    >>> with counter:
    ...     _ = jax.jit(lambda x: x * 3.0)(x)
    >>> counter.count
    1
    """

    _lock = threading.Lock()
    _alive = 0
    _running = threading.local()

    def __init__(self) -> None:
        self.count = 0
        with CompileCounter._lock:
            if CompileCounter._alive == 0:
                jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
            CompileCounter._alive += 1
        weakref.finalize(self, CompileCounter._release)

    @staticmethod
    def _release() -> None:
        with CompileCounter._lock:
            CompileCounter._alive -= 1
            if CompileCounter._alive == 0:
                jax.monitoring.unregister_event_duration_listener(_on_event_duration)

    def __enter__(self) -> CompileCounter:
        _stack().append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _stack().pop()


def _stack() -> list[CompileCounter]:
    """This thread's active counters, innermost last."""
    try:
        return CompileCounter._running.stack
    except AttributeError:
        CompileCounter._running.stack = []
        return CompileCounter._running.stack


def _on_event_duration(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        stack = _stack()
        if stack:
            stack[-1].count += 1
