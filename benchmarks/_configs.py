"""The benchmark configurations (:data:`CONFIGS`, defined here) and their FLOP counts."""

from __future__ import annotations

import dataclasses
from typing import Literal

Mode = Literal["inference", "stream", "train"]

FRAME_SECONDS = 0.016
"""One streamed frame of ``subband-stream`` is 16 ms of audio: its real-time budget."""


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration.

    Attributes:
      name: the name used in the table and on the command line.
      batch, bands, features, units, layers: the model and input sizes; inputs
        are ``[batch, bands, time, features]``.
      time: time steps per call (``1`` for streaming: one frame per call).
      mode: ``"inference"`` (one full-sequence call), ``"stream"`` (one frame
        per call, the state carried) or ``"train"`` (one optimiser step).
      frames: for streaming, frames per timed run; the time reported is per frame.
      realtime_frame: if set, the real-time budget of one frame in seconds;
        the table then reports the real-time factor (time per frame / budget).
    """

    name: str
    batch: int
    bands: int
    time: int
    features: int
    units: int
    layers: int
    mode: Mode
    frames: int = 1
    realtime_frame: float | None = None

    @property
    def rows(self) -> int:
        """Independent recurrences: one per (sequence, band)."""
        return self.batch * self.bands

    def layer_inputs(self, layer: int) -> int:
        """Input size of ``layer``: the features for the first, ``units`` after."""
        return self.features if layer == 0 else self.units

    def flops(self) -> float:
        """FLOPs of one timed unit: a call (inference), a frame (stream) or a step (train).

        ``8 * units * (in + units)`` per row, time step and layer (the two
        matmuls into the four gates, two FLOPs per multiply-add); three times
        that for a training step (forward plus the two matmuls of the backward).
        """
        per_step = sum(
            8 * self.units * (self.layer_inputs(layer) + self.units) for layer in range(self.layers)
        )
        total = float(per_step * self.rows * self.time)
        return 3.0 * total if self.mode == "train" else total


CONFIGS: dict[str, Config] = {
    config.name: config
    for config in (
        # name, batch, bands, time, features, units, layers, mode, frames per timed run
        Config("seed", 8, 3, 1000, 4, 64, 1, "inference"),
        Config("seed-stream", 1, 3, 1, 4, 64, 1, "stream", frames=200),
        Config("subband-stream", 1, 257, 1, 32, 384, 2, "stream", 25, FRAME_SECONDS),
        Config("subband-offline", 1, 257, 192, 32, 384, 2, "inference"),
        Config("train", 8, 16, 256, 32, 128, 1, "train"),
    )
}
"""Every benchmark configuration, in the order the report's tables list them."""

MEMORY_TIME = 10_000
"""Time steps of the training step whose compiled memory the table reports."""

MEMORY_REMAT_CHUNK = 100
"""``remat_chunk`` for the remat row of the memory table (about sqrt of ``MEMORY_TIME``)."""
