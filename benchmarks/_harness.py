"""Parity checks, interleaved timing and compilation counting.

Every implementation of a configuration is an :class:`Impl`: a function that
returns its outputs (for the parity check, in the canonical layout) and a
function that runs one timed unit. :func:`benchmark` checks every row against
ours before timing anything, drops the rows that disagree (loudly), and then
times the rest round-robin, so that drift of the machine hits every row alike.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Callable

try:
    import resource
except ImportError:  # not on Windows: the page-fault column reads "–" there
    resource = None

import numpy as np

from ._configs import Config

TOLERANCE = 1e-5
"""Largest max-abs difference between two implementations' outputs that counts as agreement."""

GRAD_TOLERANCE = 1e-4
"""Largest gradient difference, relative to the gradient's largest entry, that still agrees."""

OURS = "ours"
OURS_SHARDED = "ours-sharded"
"""Ours with the batch split over several CPU devices, where that applies."""
OURS_SCAN = "ours-scan"
"""Ours on the XLA scan (``implementation="scan"``) instead of the native kernel."""
OURS_STEP = "ours-step"
"""Streaming through the pure ``stream_step`` instead of ``Stream``: the
forward weights are packed inside every call."""
OURS_VARIANTS = (OURS_SHARDED, OURS_SCAN, OURS_STEP)
"""Rows that run our own code another way: checked against ours, but they do
not count as the baseline that ours must agree with."""


class ParityError(AssertionError):
    """Outputs of two implementations disagree: the row must not be timed."""


@dataclasses.dataclass
class Impl:
    """One implementation of one configuration.

    Attributes:
      name: ``"ours"``, ``"torch"``, ``"keras"`` or ``"flax"``.
      outputs: computes fresh outputs for the parity check, a dict of arrays in
        the canonical layout (the same keys for every implementation).
      run: runs one timed unit and waits for its result: a call, a training
        step, or ``per_run`` streamed frames.
      per_run: timed units (frames) per ``run``; the time reported is per unit.
      compile_seconds: compilation time measured ahead of time, or None.
      uses_jax: whether compilations during ``run`` are counted.
      note: what exactly runs (shown under the table).
      checked: whether the row takes part in the parity check; False for the
        SGEMM runs that measure the floor in the same rounds.
      flops: FLOPs per unit of an SGEMM row (its rate is ``flops / median``).
    """

    name: str
    outputs: Callable[[], dict[str, np.ndarray]]
    run: Callable[[], None]
    per_run: int = 1
    compile_seconds: float | None = None
    uses_jax: bool = True
    note: str = ""
    checked: bool = True
    flops: float | None = None


PARITY_FRAMES = 10
"""Frames streamed from a zero state for the parity check of a streaming configuration."""


def jax_stream_impl(
    name: str,
    step: Callable,
    params,
    zeros: Callable[[], object],
    frames: list,
    note: str,
) -> Impl:
    """The :class:`Impl` of a jitted streaming step ``step(params, state, frame)
    -> (state, outputs [batch, bands, 1, units])`` over ``frames``, starting
    from ``zeros()`` and carrying its state from one timed run to the next."""
    state = [zeros()]

    def outputs():
        carried, ys = zeros(), []
        for frame in frames[:PARITY_FRAMES]:
            carried, y = step(params, carried, frame)
            ys.append(np.asarray(y)[:, :, 0])
        return {"outputs": np.stack(ys)}

    def run():
        carried = state[0]
        for frame in frames:
            carried, y = step(params, carried, frame)
            y.block_until_ready()
        state[0] = carried

    return Impl(
        name,
        outputs,
        run,
        per_run=len(frames),
        compile_seconds=compile_seconds(step, params, state[0], frames[0]),
        note=note,
    )


@dataclasses.dataclass
class Row:
    """The measurements of one implementation of one configuration.

    ``times`` are seconds per timed unit (per call, step or frame), one per repeat;
    ``faults`` the process's minor page faults per timed unit in the same runs
    (memory the allocator took fresh from the kernel, which every run then pays
    for touching), empty where the platform does not count them.
    ``error`` is set (and nothing is timed) when the row failed its parity check
    or raised; ``parity`` describes its largest difference from ours.
    """

    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    faults: list[float] = dataclasses.field(default_factory=list)
    compile_seconds: float | None = None
    recompiles: int | None = None
    parity: str | None = None
    error: str | None = None
    note: str = ""
    checked: bool = True
    flops: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times, 90))

    @property
    def median_faults(self) -> float | None:
        return float(np.median(self.faults)) if self.faults else None


@dataclasses.dataclass
class Result:
    """All rows of one configuration, ours first.

    ``rate`` is the large-SGEMM rate (FLOP/s) timed in the same rounds, the
    floor's denominator; None if no SGEMM row was timed.
    """

    config: Config
    rows: list[Row]
    rate: float | None = None

    def row(self, name: str) -> Row | None:
        return next((row for row in self.rows if row.name == name), None)


# --- compilation counting --------------------------------------------------------

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations = [0]
_listening = [False]


def _on_event(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        _compilations[0] += 1


def compilations() -> int:
    """XLA compilations in this process since the first call (a monotone counter)."""
    if not _listening[0]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening[0] = True
    return _compilations[0]


def compile_seconds(fn, *args) -> float | None:
    """Seconds to lower and compile the jitted ``fn`` for ``args``, or None if
    ``fn`` cannot be lowered ahead of time."""
    lower = getattr(fn, "lower", None)
    if lower is None:
        return None
    start = time.perf_counter()
    lower(*args).compile()
    return time.perf_counter() - start


# --- parity ----------------------------------------------------------------------


def compare(ours: dict[str, np.ndarray], other: dict[str, np.ndarray], tolerance: float):
    """``(agree, text)``: outputs and losses must agree to ``tolerance`` in max
    abs difference; gradients (keys ``"param/..."``) to ``GRAD_TOLERANCE``
    relative to ours' largest entry of that gradient (a mean loss makes
    gradients small, so an absolute bound would say little about them)."""
    if ours.keys() != other.keys():
        return False, f"different keys: {sorted(ours)} vs {sorted(other)}"
    worst, worst_grad = 0.0, None
    for key in ours:
        a, b = np.asarray(ours[key], np.float64), np.asarray(other[key], np.float64)
        if a.shape != b.shape:
            return False, f"{key}: shape {a.shape} vs {b.shape}"
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        if "/" in key:
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            relative = diff / scale if scale > 0 else diff
            worst_grad = relative if worst_grad is None else max(worst_grad, relative)
        else:
            worst = max(worst, diff)
    values = [worst] + ([] if worst_grad is None else [worst_grad])
    if any(np.isnan(v) for v in values):
        return False, "NaN"
    text = f"{worst:.1e}"
    agree = worst <= tolerance
    if worst_grad is not None:
        text += f", grads {worst_grad:.1e} rel."
        agree = agree and worst_grad <= GRAD_TOLERANCE
    return agree, text


def _shout(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)


def check_parity(config: Config, impls: list[Impl], rows: list[Row], tolerance: float) -> None:
    """Compares every implementation's outputs with ours; marks the rows that
    disagree as failed (and ours too if it agrees with no baseline)."""
    pairs = [(impl, row) for impl, row in zip(impls, rows, strict=True) if impl.checked]
    impls, rows = [impl for impl, _ in pairs], [row for _, row in pairs]
    outputs = {}
    for impl, row in zip(impls, rows, strict=True):
        try:
            outputs[impl.name] = {k: np.asarray(v) for k, v in impl.outputs().items()}
        except Exception as error:  # a broken baseline must not take the others down
            row.error = f"error: {type(error).__name__}: {error}"
            _shout(f"{config.name}/{impl.name}: computing outputs raised {row.error}")
    ours_row = rows[0]
    if OURS not in outputs:
        ours_row.error = ours_row.error or "error: no outputs"
        for row in rows[1:]:
            row.error = row.error or "not timed: ours failed"
        return
    agreeing = 0  # baselines only: the variants of ours run our own code
    for row in rows[1:]:
        if row.name not in outputs:
            continue
        agree, row.parity = compare(outputs[OURS], outputs[row.name], tolerance)
        if agree:
            if row.name not in OURS_VARIANTS:
                agreeing += 1
        else:
            row.error = f"PARITY FAILED: {row.parity} (tolerance {tolerance:g})"
            _shout(
                f"{config.name}/{row.name}: outputs disagree with ours ({row.parity}; "
                f"tolerance {tolerance:g}, gradients {GRAD_TOLERANCE:g} relative); "
                "this row is NOT timed"
            )
    if any(row.name not in OURS_VARIANTS for row in rows[1:]) and agreeing == 0:
        ours_row.error = "PARITY FAILED: ours agrees with no baseline"
        _shout(f"{config.name}: ours agrees with no baseline; the configuration is NOT timed")
        for row in rows[1:]:
            row.error = row.error or "not timed: ours failed"


# --- timing ----------------------------------------------------------------------


def _minor_faults() -> int | None:
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


SETTLE_SECONDS = 0.03
"""Idle time before each timed run. Rows share one process, and some leave
threads busy after they return: torch's OpenMP workers spin for about 14 ms
(libgomp's default spin count) waiting for more work, which takes a core from
whatever runs next (ours on the seed shapes: 4.1 ms alone, 8.5 ms right after
a torch call; benchmarks/NOTES.md, entry 13). Waiting this long first times
each row as it runs in a process of its own."""


def _timed(impl: Impl) -> tuple[float, float | None]:
    """Seconds and minor page faults per unit of one ``impl.run()``, after
    :data:`SETTLE_SECONDS` of idling."""
    time.sleep(SETTLE_SECONDS)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        faults = _minor_faults()
        start = time.perf_counter()
        impl.run()
        elapsed = time.perf_counter() - start
        if faults is not None:
            faults = (_minor_faults() - faults) / impl.per_run
        return elapsed / impl.per_run, faults
    finally:
        if gc_was_enabled:
            gc.enable()


def time_interleaved(impls: list[Impl], rows: list[Row], repeats: int, warmup: int) -> None:
    """Runs ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round
    runs every implementation once, the starting one rotating from round to
    round. Counts the JAX compilations during the timed rounds per row."""
    live = [(impl, row) for impl, row in zip(impls, rows, strict=True) if row.error is None]
    for _ in range(warmup):
        for impl, row in live:
            try:
                impl.run()
            except Exception as error:
                row.error = f"error: {type(error).__name__}: {error}"
                _shout(f"{row.name}: warm-up raised {row.error}")
    live = [(impl, row) for impl, row in live if row.error is None]
    for impl, row in live:
        row.recompiles = 0 if impl.uses_jax else None
    for repeat in range(repeats):
        gc.collect()
        shift = repeat % max(len(live), 1)
        for impl, row in live[shift:] + live[:shift]:
            before = compilations()
            seconds, faults = _timed(impl)
            row.times.append(seconds)
            if faults is not None:
                row.faults.append(faults)
            if impl.uses_jax:
                row.recompiles += compilations() - before


def benchmark(
    config: Config,
    impls: list[Impl],
    *,
    repeats: int,
    warmup: int = 2,
    tolerance: float = TOLERANCE,
) -> Result:
    """Checks parity (ours must come first in ``impls``), then times the rows that agree."""
    if not impls or impls[0].name != OURS:
        raise ValueError(f"impls: expected ours first; received {[i.name for i in impls]}")
    rows = [
        Row(
            impl.name,
            compile_seconds=impl.compile_seconds,
            note=impl.note,
            checked=impl.checked,
            flops=impl.flops,
        )
        for impl in impls
    ]
    compilations()  # start listening before anything compiles
    check_parity(config, impls, rows, tolerance)
    time_interleaved(impls, rows, repeats, warmup)
    rates = [row.flops / row.median for row in rows if not row.checked and row.ok and row.flops]
    return Result(config, [row for row in rows if row.checked], max(rates, default=None))


# --- the machine's SGEMM rate ----------------------------------------------------


def sgemm_impls(size: int = 2048) -> list[Impl]:
    """Unchecked rows that time a ``size x size @ size x size`` float32 matmul,
    in JAX (jitted) and in torch (2 threads, if installed)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    flops = 2.0 * size**3
    matmul = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    impls = [
        Impl(
            "sgemm-jax",
            dict,
            lambda: matmul(ja, jb).block_until_ready(),
            checked=False,
            flops=flops,
        )
    ]
    try:
        import torch
    except ImportError:
        return impls
    torch.set_num_threads(2)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    impls.append(
        Impl(
            "sgemm-torch",
            dict,
            lambda: torch.mm(ta, tb),
            uses_jax=False,
            checked=False,
            flops=flops,
        )
    )
    return impls


def sgemm_rates(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of :func:`sgemm_impls`, timed round-robin: ``{"jax": ..., "torch": ...}``."""
    impls = sgemm_impls(size)
    rows = [Row(impl.name) for impl in impls]
    time_interleaved(impls, rows, repeats, warmup=1)
    return {
        impl.name.removeprefix("sgemm-"): impl.flops / row.median
        for impl, row in zip(impls, rows, strict=True)
    }
