"""Counting XLA compilations, charged to whoever is running when they happen."""

from __future__ import annotations

import threading
from typing import Any

import jax

# JAX fires this monitoring event once per backend compilation, in the thread
# that compiles.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts the XLA compilations that happen inside ``with counter:`` blocks.

    Eager operations count too. Blocks nest: a compilation is charged to the
    innermost active counter of the thread that compiles. JAX's monitoring
    listener is registered while at least one block is active in the process,
    and removed when the last one ends.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones(7)
    >>> counter = CompileCounter()
    >>> with counter:
    ...     _ = jax.jit(lambda x: x * 3.0)(x)
    >>> counter.count
    1
    """

    _lock = threading.Lock()
    _active = 0
    _running = threading.local()

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> CompileCounter:
        stack = self._stack()
        stack.append(self)
        with CompileCounter._lock:
            if CompileCounter._active == 0:
                jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
            CompileCounter._active += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        with CompileCounter._lock:
            CompileCounter._active -= 1
            if CompileCounter._active == 0:
                jax.monitoring.unregister_event_duration_listener(_on_event_duration)
        self._stack().pop()

    @classmethod
    def _stack(cls) -> list[CompileCounter]:
        if not hasattr(cls._running, "stack"):
            cls._running.stack = []
        return cls._running.stack

    @classmethod
    def current(cls) -> CompileCounter | None:
        """The innermost active counter of this thread, if any."""
        stack = cls._stack()
        return stack[-1] if stack else None


def _on_event_duration(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        counter = CompileCounter.current()
        if counter is not None:
            counter.count += 1
