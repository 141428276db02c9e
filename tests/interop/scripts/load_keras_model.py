"""Loads a saved Keras model without ``import interop`` (tests/interop/test_interop_layer.py):
it must fail, naming the class to register and its module.

Usage: ``python load_keras_model.py MODEL_FILE``.
"""

import sys

import keras

keras.saving.load_model(sys.argv[1])
