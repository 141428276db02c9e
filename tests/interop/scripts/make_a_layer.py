"""Imports interop and makes a BandedLSTMLayer, under the Keras backend that
KERAS_BACKEND names (tests/interop/test_interop_layer.py): on any other than
JAX, the import or the layer must fail with a message that says what to set.
"""

import interop

interop.BandedLSTMLayer(3)
