"""Importing banded_rnn imports neither onnx nor onnxruntime: export_onnx
imports them when called (tests/streaming/test_onnx_export.py)."""

import sys

import banded_rnn  # noqa: F401

loaded = sorted({"onnx", "onnxruntime"} & set(sys.modules))
assert not loaded, f"importing banded_rnn imported {loaded}"
print("ok", flush=True)
