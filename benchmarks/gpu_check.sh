#!/usr/bin/env bash
# The GPU check: cuDNN's path (implementation="cudnn") tested and benchmarked on
# a machine with a CUDA GPU, in one run of a few minutes. From the repository root:
#
#   bash benchmarks/gpu_check.sh
#
# It expects Python with JAX and its CUDA plugin, flax, optax, numpy, pytest and
# hypothesis installed, and needs no network and no build: everything is
# imported from the working tree (the native CPU kernel plays no part on a
# GPU). Keras 3, for the Keras-JAX baseline, and its two dependencies such an
# image may lack travel as wheels in .whl/, made on a machine with the package
# index (for Python 3.12; change --python-version to the GPU machine's):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 optree==0.20.0 namex==0.1.0
#
# Writes, to $OUT when it is set (else benchmarks/): gpu-tests.log (the cuDNN
# tests, and how far TF32 moves the outputs) and RESULTS-gpu.md (seed,
# subband-offline and train: our cuDNN path, our scan, Flax and Keras-JAX, all
# at jax_default_matmul_precision="highest", outputs checked against each
# other before timing). Every part runs even if an earlier one fails; the exit
# status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}"
status=0
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || status=$?
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  # Parity with the scan and the float64 reference, gradients, training steps,
  # chunked == whole: cuDNN itself, at precision "highest".
  python3 -m pytest -q -p no:cacheprovider -o addopts="" -W default::DeprecationWarning \
    tests/kernel/test_cudnn.py
} 2>&1 | tee "$out/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || [ "$status" -ne 0 ] || status=1
# What TF32 (cuDNN's default precision) changes: the largest deviation of the
# outputs from the scan at "highest", on the train configuration's shapes.
python3 - <<'PY' 2>&1 | tee -a "$out/gpu-tests.log"
import jax, numpy as np
from banded_rnn import BandedLSTM
x = jax.random.normal(jax.random.key(0), (8, 16, 256, 32))
variables = BandedLSTM(128).init(jax.random.key(1), None, x)
with jax.default_matmul_precision("highest"):
    _, reference = BandedLSTM(128, implementation="scan").apply(variables, None, x)
    _, highest = BandedLSTM(128, implementation="cudnn").apply(variables, None, x)
_, default = BandedLSTM(128, implementation="cudnn").apply(variables, None, x)
for name, y in (("highest", highest), ("default (TF32)", default)):
    print(f"cuDNN at {name}: max |outputs - scan| = {float(np.max(np.abs(y - reference))):.2e}")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || [ "$status" -ne 0 ] || status=1
JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m benchmarks.run --quick \
  --only seed subband-offline train --baselines flax keras --cpu-devices 1 --no-memory \
  --out "$out/RESULTS-gpu.md"
rc=$?
[ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
exit "$status"
