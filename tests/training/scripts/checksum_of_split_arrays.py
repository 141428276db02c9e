"""The checksum of checkpoints whose arrays are split over processes
(``banded_rnn.training._checkpoint._global_sum``), on two CPU devices of one
process: the same values give the same sum whether whole on one device, split
over two by rows or by columns, or replicated; changing any one bit of any
element changes it. For tests/training/test_processes_must_agree.py; prints
``ok``."""

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from banded_rnn.training._checkpoint import _global_sum  # noqa: E402

rng = np.random.default_rng(0)
values = {
    "params": rng.standard_normal((6, 8)).astype(np.float32),
    "state": rng.standard_normal((4, 3, 5)).astype(np.float32),
    "step": np.asarray(7, np.int32),
    "rng": np.array([1, 2], np.uint32),
}
mesh = Mesh(np.array(jax.devices()), ("x",))
layouts = {
    "whole": lambda a: jax.device_put(a, jax.devices()[0]),
    "rows": lambda a: jax.device_put(a, NamedSharding(mesh, P("x") if a.ndim else P())),
    "columns": lambda a: jax.device_put(
        a, NamedSharding(mesh, P(None, "x") if a.ndim >= 2 and a.shape[1] % 2 == 0 else P())
    ),
    "replicated": lambda a: jax.device_put(a, NamedSharding(mesh, P())),
    "host": lambda a: a,
}
sums = {name: _global_sum({k: put(v) for k, v in values.items()}) for name, put in layouts.items()}
assert len(set(sums.values())) == 1, sums
expected = sums["whole"]
for key in ("params", "state", "step", "rng"):
    flat = values[key].reshape(-1).view(np.uint32)
    for trial in range(20):
        index, bit = rng.integers(flat.size), rng.integers(32)
        changed = flat.copy()
        changed[index] ^= np.uint32(1 << bit)
        tree = dict(values)
        tree[key] = changed.view(values[key].dtype).reshape(values[key].shape)
        put = layouts[("rows", "columns", "host")[trial % 3]]
        got = _global_sum({k: put(v) for k, v in tree.items()})
        assert got != expected, (key, index, bit)
print("ok", flush=True)
