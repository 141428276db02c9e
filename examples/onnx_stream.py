"""Streams a file of frames through a model exported by ``banded_rnn.export_onnx``.

    python examples/onnx_stream.py model.onnx frames.npy outputs.npy

``frames.npy`` holds one sequence, ``[time, bands, features]`` float32. Each
frame runs as one call of the ONNX model (a chunk ``[1, bands, 1,
features]``), and the state lives here, outside the model: zeros at the
start, then each call's ``final_state.*`` passed back as the next call's
``state.*``. The outputs, ``[time, bands, ...]``, are written to
``outputs.npy``. Needs only NumPy and onnxruntime: the same loop runs from
ONNX Runtime's C, C++, C# or Java API.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime


def zero_state(session: onnxruntime.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    """Zeros for every ``state.*`` input, read from the model's input shapes
    (the dynamic ``batch`` set to ``batch``): a new stream, or a reset."""
    return {
        spec.name: np.zeros([batch if d == "batch" else d for d in spec.shape], np.float32)
        for spec in session.get_inputs()
        if spec.name.startswith("state")
    }


def stream(session: onnxruntime.InferenceSession, frames: np.ndarray) -> np.ndarray:
    """``frames [time, bands, features]`` one by one, the state carried between calls."""
    state = zero_state(session)
    outputs = []
    for frame in frames:
        chunk = frame[None, :, None, :]  # [batch=1, bands, time=1, features]
        y, *final = session.run(None, {"chunk": chunk, **state})
        state = dict(zip(state, final, strict=True))  # final_state.* -> state.*, in order
        outputs.append(y[0, :, 0])
    return np.stack(outputs)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    model, frames, out = argv
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    np.save(out, stream(session, np.load(frames).astype(np.float32)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
