"""Simulated live clients for ``benchmarks.serving_load``: each sends one frame
every ``period`` seconds, at its own phase, for a fixed duration.

A frame's latency runs from the moment it is due (its tick of the client's
clock) to the moment its outputs are back: a client that falls behind counts
its backlog, as a real-time client would. Every loop is bounded: each client
sends ``count`` frames and each wait has a timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

WAIT_S = 60.0
"""The longest any frame's outputs are waited for."""


class Schedule:
    """When each of ``clients`` clients sends its frames: from ``start``, every
    ``period`` seconds, each at a random phase in ``[0, period)``."""

    def __init__(self, clients: int, duration: float, period: float, seed: int) -> None:
        self.period = period
        self.count = max(int(duration / period), 1)
        self.phases = np.random.default_rng(seed).uniform(0.0, period, clients)
        self.restart()

    def restart(self) -> None:
        """The first frames are due from 0.1 s after now."""
        self.start = time.perf_counter() + 0.1

    def due(self, client: int, frame: int) -> float:
        return self.start + self.phases[client] + frame * self.period


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _run_threads(clients: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 2)
        if thread.is_alive():
            raise TimeoutError("a simulated client did not finish")


def blocking_clients(
    calls: list[Callable[[np.ndarray], object]], frames: np.ndarray, schedule: Schedule
) -> list[list[float]]:
    """Each client ``c`` calls ``calls[c](frame)`` and waits for it (one
    ``Stream`` or one torch loop per client); latencies per client."""
    latencies: list[list[float]] = [[] for _ in calls]

    def client(c: int) -> None:
        for k in range(schedule.count):
            due = schedule.due(c, k)
            _sleep_until(due)
            calls[c](frames[(c + k) % len(frames)])
            latencies[c].append(time.perf_counter() - due)

    _run_threads(len(calls), client)
    return latencies


def submitting_clients(
    submit: Callable[[int, np.ndarray], Future], frames: np.ndarray, schedule: Schedule
) -> list[list[float]]:
    """Each client ``c`` sends its frames on time with ``submit(c, frame)``
    (a future) and never waits to send the next; latencies per client."""
    clients = len(schedule.phases)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    futures: list[Future] = []

    def record(c: int, due: float, future: Future) -> None:
        # A refused frame (its sequence too far behind: max_queued) never arrives.
        refused = future.cancelled() or future.exception() is not None
        latencies[c].append(float("inf") if refused else time.perf_counter() - due)

    def client(c: int) -> None:
        for k in range(schedule.count):
            due = schedule.due(c, k)
            _sleep_until(due)
            future = submit(c, frames[(c + k) % len(frames)])
            future.add_done_callback(lambda f, c=c, due=due: record(c, due, f))
            futures.append(future)

    _run_threads(clients, client)
    for future in futures:
        future.exception(WAIT_S)  # waits; a refusal is counted by record
    return latencies


def websocket_clients(
    url: str, frames: np.ndarray, schedule: Schedule, kept: list | None = None
) -> list[list[float]]:
    """Each client its own connection: a thread sends its frames on time, and
    another receives the outputs; latencies per client, client 0's outputs
    appended to ``kept``."""
    from banded_rnn.serving import Client

    clients = len(schedule.phases)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    connections = [Client(url, timeout=WAIT_S) for _ in range(clients)]
    try:
        for c, connection in enumerate(connections):
            connection.start(f"client{c}")
        schedule.restart()

        def sender(c: int) -> None:
            for k in range(schedule.count):
                _sleep_until(schedule.due(c, k))
                connections[c].send(f"client{c}", frames[(c + k) % len(frames)])

        def receiver(c: int) -> None:
            for _ in range(schedule.count):
                _, number, outputs = connections[c].receive(timeout=WAIT_S)
                latencies[c].append(time.perf_counter() - schedule.due(c, number))
                if kept is not None and c == 0:
                    kept.append(outputs)

        _run_threads(2 * clients, lambda i: (sender if i < clients else receiver)(i % clients))
    finally:
        for connection in connections:
            connection.close()
    return latencies
