"""The model a server serves: ``module:function``, and a variables file."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from banded_rnn.serving import load_model, save_variables

from served_model import make


def test_a_variables_file_replaces_the_functions_variables(tmp_path):
    model, variables = make()
    changed = jax.tree.map(lambda leaf: np.asarray(leaf) + 1.0, variables)
    save_variables(tmp_path / "v.npz", changed)
    loaded_model, loaded = load_model("served_model:make", tmp_path / "v.npz")
    assert loaded_model == model
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, changed))
    assert load_model("served_model:make")[1] is not None  # without a file: the function's


def test_a_variables_file_of_another_model_is_refused_naming_the_paths(tmp_path):
    _, variables = make()
    params = dict(variables["params"])
    del params["layer_1"]
    params["layer_0"] = {**params["layer_0"], "bias": np.zeros(3, np.float32)}
    save_variables(tmp_path / "v.npz", {"params": params, "extra": {"x": np.zeros(1)}})
    missing = r"missing \['params/layer_1/bias', .*unexpected \['extra/x'\], "
    shapes = r"other \(shape, dtype\) at \[\('params/layer_0/bias', \(\(20,\), 'float32'\), "
    shapes += r"\(\(3,\), 'float32'\)\)\]"
    with pytest.raises(ValueError, match=missing + shapes):
        load_model("served_model:make", tmp_path / "v.npz")
    as_float64 = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), dict(variables))
    save_variables(tmp_path / "f64.npz", as_float64)
    dtypes = r"other \(shape, dtype\) at \[\('params/layer_0/bias', \(\(20,\), 'float32'\), "
    dtypes += r"\(\(20,\), 'float64'\)\)"
    with pytest.raises(ValueError, match=dtypes):
        load_model("served_model:make", tmp_path / "f64.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"variables: cannot read .*bad.npz' as .npz"):
        load_model("served_model:make", tmp_path / "bad.npz")


@pytest.mark.parametrize(
    "factory, error, message",
    [
        ("served_model", ValueError, r"model: expected 'module:function'; received 'served_model'"),
        ("no_such_module:make", ValueError, r"model: cannot load 'no_such_module:make'"),
        ("served_model:missing", ValueError, r"model: cannot load 'served_model:missing'"),
        ("served_model:not_a_model", TypeError, r"to return \(model, variables\).*received tuple"),
    ],
)
def test_a_factory_that_is_not_one_is_refused(factory, error, message):
    with pytest.raises(error, match=message):
        load_model(factory)


def test_save_variables_refuses_what_is_not_a_mapping(tmp_path):
    with pytest.raises(TypeError, match=r"variables: expected nested mappings; received list"):
        save_variables(tmp_path / "v.npz", [np.zeros(1)])
