"""Probes for optimising the core: where the time of a configuration goes.

    python -m benchmarks.probe [--only gemm loop fused unroll] [--repeats N]

* ``gemm``: the rate of the per-step matmuls of each configuration (the fused
  ``[rows, in + units] @ [in + units, 4 * units]`` and the recurrent part alone,
  plus the hoisted input projection over all steps), in JAX and torch, against
  the large SGEMM: the floor the table uses assumes large-SGEMM efficiency.
* ``loop``: the cost of one iteration of an XLA:CPU while loop carrying a
  state ``[rows, units]``, empty and with the step's fused matmul (and a
  ``tanh``): what a step costs before any gate maths.
* ``fused``: a step's gate matmul as one ``[x, h] @ W``, as two dots, or with
  the input projection hoisted out of the loop as one large GEMM.
* ``unroll``: ``BandedLSTM(unroll=k)`` on ``seed`` and ``subband-offline``.
* ``frame``: where the time of one streamed frame goes, for ``seed-stream``
  and ``subband-stream``: a jitted function of the step's signature that does
  no work (dispatch alone), the compiled step with the weights packed ahead,
  ``stream_step`` (packing them in the call), and ``Stream`` with device or
  NumPy frames and outputs.

Every group is timed round-robin in this process; compare within a group.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from banded_rnn import BandedLSTM, Stream, stream_step

from ._configs import CONFIGS
from ._harness import sgemm_rates
from ._weights import random_weights, to_ours


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each blocking ``fn``, timed round-robin."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _matmul_runners(m: int, k: int, n: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    matmul = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {
        "jax": lambda: matmul(ja, jb).block_until_ready(),
        "torch": lambda: torch.mm(ta, tb),
    }


def gemm(repeats: int) -> list[str]:
    import torch

    torch.set_num_threads(2)
    rates = sgemm_rates(repeats=repeats)
    big = max(rates.values())
    lines = [
        f"large SGEMM: {', '.join(f'{k} {v / 1e9:.1f}' for k, v in rates.items())} GFLOP/s",
        "| config | matmul [m, k] @ [k, n] (one call each, dispatch included) | JAX GFLOP/s "
        "| torch GFLOP/s | best / large SGEMM |",
        "|---|---|---|---|---|",
    ]
    for config in CONFIGS.values():
        shapes = []
        for layer in range(config.layers):
            fan_in = config.layer_inputs(layer)
            shapes.append((f"layer {layer} fused", config.rows, fan_in + config.units))
            shapes.append((f"layer {layer} recurrent", config.rows, config.units))
            if config.time > 1:
                shapes.append((f"layer {layer} hoisted input", config.rows * config.time, fan_in))
        for label, m, k in shapes:
            n = 4 * config.units
            medians = interleaved(_matmul_runners(m, k, n), repeats)
            flops = 2.0 * m * k * n
            jax_rate, torch_rate = flops / medians["jax"], flops / medians["torch"]
            lines.append(
                f"| `{config.name}` {label} | [{m}, {k}] @ [{k}, {n}] | {jax_rate / 1e9:.1f} "
                f"| {torch_rate / 1e9:.1f} | {max(jax_rate, torch_rate) / big:.2f} |"
            )
    return lines


def loop(repeats: int) -> list[str]:
    rate = max(sgemm_rates(repeats=repeats).values())
    lines = [
        "| config | steps | empty loop / step | loop with the fused matmul / step "
        "| its GFLOP/s | of large SGEMM |",
        "|---|---|---|---|---|---|",
    ]
    for config in CONFIGS.values():
        rows, units, k = config.rows, config.units, config.features + config.units
        flops = 2.0 * rows * k * 4 * units
        steps = int(np.clip(0.05 / (flops / 50e9), 20, 1000))  # about 50 ms of work
        h = jnp.zeros((rows, units))
        x = jnp.ones((steps, rows, k - units))
        w = jnp.asarray(np.random.default_rng(0).standard_normal((k, 4 * units)), jnp.float32)

        @jax.jit
        def empty(h, steps=steps):
            return jax.lax.fori_loop(0, steps, lambda i, h: h * 0.5 + 1.0, h)

        @jax.jit
        def with_matmul(h, x, w, steps=steps, units=units):
            def body(i, h):
                z = jnp.concatenate([x[i], h], axis=-1) @ w
                # Every gate column is used, so XLA cannot shrink the matmul.
                return jnp.tanh(z.reshape(-1, 4, units).sum(axis=1))

            return jax.lax.fori_loop(0, steps, body, h)

        medians = interleaved(
            {
                "empty": lambda empty=empty, h=h: empty(h).block_until_ready(),
                "loop": lambda f=with_matmul, h=h, x=x, w=w: f(h, x, w).block_until_ready(),
            },
            repeats,
        )
        per_step = medians["loop"] / steps
        lines.append(
            f"| `{config.name}` | {steps} | {medians['empty'] / steps * 1e6:.2f} µs "
            f"| {per_step * 1e6:.2f} µs | {flops / per_step / 1e9:.1f} "
            f"| {flops / per_step / rate:.2f} |"
        )
    return lines


def fused(repeats: int) -> list[str]:
    """One step's gate matmul three ways, inside a jitted loop over ``steps``."""
    lines = [
        "| config, layer | steps | concat [x, h] @ W (fused) | x @ Wx + h @ Wh (two dots) "
        "| X @ Wx hoisted, then h @ Wh per step |",
        "|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for config in CONFIGS.values():
        for layer in range(config.layers):
            rows, units, fan_in = config.rows, config.units, config.layer_inputs(layer)
            flops = 2.0 * rows * (fan_in + units) * 4 * units
            steps = int(np.clip(0.05 / (flops / 50e9), 20, 1000))
            xs = jnp.asarray(rng.standard_normal((steps, rows, fan_in)), jnp.float32) * 0.1
            wx = jnp.asarray(rng.standard_normal((fan_in, 4 * units)), jnp.float32) * 0.05
            wh = jnp.asarray(rng.standard_normal((units, 4 * units)), jnp.float32) * 0.05
            h0 = jnp.zeros((rows, units))

            def squash(z, units=units):
                return jnp.tanh(z.reshape(-1, 4, units).sum(axis=1))

            @jax.jit
            def fused_dot(h, xs, wx, wh):
                w = jnp.concatenate([wx, wh], axis=0)
                step = lambda h, x: (squash(jnp.concatenate([x, h], axis=-1) @ w),) * 2  # noqa: E731
                return jax.lax.scan(step, h, xs)

            @jax.jit
            def two_dots(h, xs, wx, wh):
                step = lambda h, x: (squash(x @ wx + h @ wh),) * 2  # noqa: E731
                return jax.lax.scan(step, h, xs)

            @jax.jit
            def hoisted(h, xs, wx, wh):
                step = lambda h, p: (squash(p + h @ wh),) * 2  # noqa: E731
                return jax.lax.scan(step, h, xs @ wx)

            fns = {
                name: lambda f=f, h0=h0, xs=xs, wx=wx, wh=wh: jax.block_until_ready(
                    f(h0, xs, wx, wh)
                )
                for name, f in (("fused", fused_dot), ("two", two_dots), ("hoisted", hoisted))
            }
            medians = interleaved(fns, repeats)
            lines.append(
                f"| `{config.name}` {layer} | {steps} | "
                + " | ".join(f"{medians[n] / steps * 1e6:.1f} µs" for n in fns)
                + " |"
            )
    return lines


def unroll(repeats: int, factors=(1, 2, 4, 8, 16)) -> list[str]:
    lines = ["| config | " + " | ".join(f"unroll={u}" for u in factors) + " |"]
    lines.append("|---|" + "---|" * len(factors))
    for name in ("seed", "subband-offline"):
        config = CONFIGS[name]
        variables = jax.device_put(to_ours(random_weights(config)))
        x = jnp.asarray(
            np.random.default_rng(1).standard_normal(
                (config.batch, config.bands, config.time, config.features)
            ),
            jnp.float32,
        )
        fns = {}
        for factor in factors:
            apply = jax.jit(BandedLSTM(config.units, config.layers, unroll=factor).apply)
            fns[factor] = lambda apply=apply, variables=variables, x=x: jax.block_until_ready(
                apply(variables, None, x)
            )
        medians = interleaved(fns, repeats if name == "seed" else max(3, repeats // 3))
        lines.append(
            f"| `{name}` | " + " | ".join(f"{medians[f] * 1e3:.2f} ms" for f in factors) + " |"
        )
    return lines


def _frame_runners(config) -> dict:
    model = BandedLSTM(config.units, config.layers)
    variables = to_ours(random_weights(config))
    frame = (
        np.random.default_rng(1)
        .standard_normal((config.batch, config.bands, 1, config.features))
        .astype(np.float32)
    )
    on_device = jax.device_put(frame)
    host = Stream(model, variables, config.batch, config.bands, max_chunk=1)
    device = Stream(model, variables, config.batch, config.bands, max_chunk=1, outputs="device")
    step = stream_step(model)
    packed = device._step_variables  # what the stream's step is given: weights packed once
    idle = jax.jit(lambda variables, state, chunk: (state, chunk + 1.0), donate_argnums=1)
    carried = {name: [model.initial_state(config.batch, config.bands)] for name in "ips"}

    def call(name, fn, variables):
        def run():
            carried[name][0], out = fn(variables, carried[name][0], on_device)
            out.block_until_ready()

        return run

    return {
        "jit of the step's signature, no work": call("i", idle, packed),
        "compiled step, weights packed ahead": call("p", step, packed),
        "stream_step (packs in the call)": call("s", step, jax.device_put(variables)),
        "Stream, device frame, outputs='device'": lambda: device(on_device).block_until_ready(),
        "Stream, NumPy frame, NumPy outputs": lambda: host(frame),
    }


def frame(repeats: int) -> list[str]:
    lines = ["| per frame | " + " | ".join(f"`{n}`" for n in ("seed-stream", "subband-stream"))]
    lines[0] += " |"
    lines.append("|---|---|---|")
    medians = []
    for name in ("seed-stream", "subband-stream"):
        config = CONFIGS[name]
        runners = _frame_runners(config)
        per_run = 200 if config.units < 100 else 1

        def repeated(fn, count=per_run):
            def run():
                for _ in range(count):
                    fn()

            return run

        timed = interleaved({k: repeated(f) for k, f in runners.items()}, repeats)
        medians.append({k: v / per_run for k, v in timed.items()})
    for row in medians[0]:
        cells = [f"{m[row] * 1e6:.1f} us" for m in medians]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


PROBES = {"gemm": gemm, "loop": loop, "fused": fused, "unroll": unroll, "frame": frame}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe")
    parser.add_argument("--only", nargs="+", choices=list(PROBES), default=list(PROBES))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    for name in args.only:
        print(f"\n## {name}\n", flush=True)
        print("\n".join(PROBES[name](args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
