"""Bad input is refused before XLA with a message naming the argument and shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banded_rnn import BandedLSTM, LSTMState

from helpers import init_model, random_inputs
from reference import lstm_reference, params_from_variables

MODEL = BandedLSTM(5, num_layers=2)
X = random_inputs(0, (2, 3, 4, 6))
VARIABLES = init_model(MODEL, X)


def apply(state=None, inputs=X, **kw):
    return MODEL.apply(VARIABLES, state, inputs, **kw)


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 6, 1), (6,)])
def test_inputs_of_wrong_rank(shape):
    with pytest.raises(
        ValueError,
        match=r"inputs: expected rank 4.*received shape "
        + str(shape).replace("(", r"\(").replace(")", r"\)"),
    ):
        apply(inputs=np.zeros(shape, np.float32))


def test_features_differ_from_parameters():
    with pytest.raises(
        ValueError, match=r"inputs: expected 6 features.*received shape \(2, 3, 4, 7\)"
    ):
        apply(inputs=np.zeros((2, 3, 4, 7), np.float32))


@pytest.mark.parametrize("implementation", ["kernel", "scan"])
def test_inputs_without_features(implementation):
    model = BandedLSTM(5, implementation=implementation)
    with pytest.raises(
        ValueError, match=r"inputs: expected at least one feature.*received shape \(2, 3, 4, 0\)"
    ):
        model.init(jax.random.key(0), None, np.zeros((2, 3, 4, 0), np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.uint8])
def test_non_float_inputs(dtype):
    with pytest.raises(TypeError, match=r"inputs: expected a floating dtype"):
        apply(inputs=np.zeros((2, 3, 4, 6), dtype))


@pytest.mark.parametrize(
    "batch, bands, units",
    [(1, 3, 5), (2, 4, 5), (2, 3, 6)],
    ids=["batch", "bands", "units"],
)
def test_state_shape_mismatch(batch, bands, units):
    zeros = jnp.zeros((batch, bands, units))
    state = (LSTMState(zeros, zeros),) * 2
    with pytest.raises(
        ValueError,
        match=r"state\[0\]\.hidden: expected shape .*\(2, 3, 5\); received \("
        + f"{batch}, {bands}, {units}",
    ):
        apply(state)


def test_wrong_number_of_layer_states():
    with pytest.raises(
        ValueError,
        match=r"state: expected a tuple of 2 LSTMState \(num_layers=2\); received 1 items",
    ):
        apply(MODEL.initial_state(2, 3)[:1])


def test_bare_lstm_state_is_refused_with_a_hint():
    with pytest.raises(TypeError, match=r"state: expected a tuple of 2 LSTMState"):
        apply(MODEL.initial_state(2, 3)[0])


def test_unnamed_pair_is_refused():
    zeros = jnp.zeros((2, 3, 5))
    with pytest.raises(TypeError, match=r"state\[1\]: expected an LSTMState"):
        apply((LSTMState(zeros, zeros), (zeros, zeros)))


@pytest.mark.parametrize("shape", [(3,), (2, 2), (2, 3, 1), ()])
def test_seq_lengths_of_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \[batch\]"):
        apply(seq_lengths=np.ones(shape, np.int32))


def test_negative_seq_lengths():
    with pytest.raises(ValueError, match="seq_lengths: expected lengths >= 0"):
        apply(seq_lengths=np.array([3, -1]))


def test_float_seq_lengths():
    with pytest.raises(TypeError, match="seq_lengths: expected an integer dtype"):
        apply(seq_lengths=np.array([3.0, 1.0]))


def test_errors_are_raised_under_jit_before_xla():
    run = jax.jit(lambda x: MODEL.apply(VARIABLES, None, x))
    with pytest.raises(ValueError, match="inputs: expected 6 features"):
        run(jnp.zeros((2, 3, 4, 2)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"units": 0},
        {"units": 3, "num_layers": 0},
        {"units": 3, "dropout": 1.0},
        {"units": 3, "recurrent_dropout": -0.1},
        {"units": 3, "unroll": 0},
    ],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(
        ValueError, match=next(k for k in kwargs if k != "units" or len(kwargs) == 1)
    ):
        BandedLSTM(**kwargs)


@pytest.mark.parametrize("shape", [(2, 5), (3, 4), (2, 2, 4), (2, 3, 4, 1)])
def test_mask_of_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"mask: expected shape \[batch, time\] = \(2, 4\)"):
        apply(mask=np.ones(shape, bool))


def test_mask_of_wrong_dtype():
    with pytest.raises(TypeError, match="mask: expected a bool dtype"):
        apply(mask=np.ones((2, 4), np.int32))


def test_mask_and_seq_lengths_together():
    with pytest.raises(ValueError, match="seq_lengths, mask: give one or the other"):
        apply(mask=np.ones((2, 4), bool), seq_lengths=np.array([1, 2]))


def test_rank_3_inputs_suggest_the_bands_axis():
    with pytest.raises(
        ValueError, match=r"received shape \(2, 4, 6\); for one band, add the bands"
    ):
        apply(inputs=X[:, 0])


def test_a_bare_pair_for_one_layer_names_lstm_state_and_the_order():
    model = BandedLSTM(5)
    variables = init_model(model, X)
    zeros = jnp.zeros((2, 3, 5))
    with pytest.raises(
        ValueError,
        match=r"state: expected a tuple of 1 LSTMState .*received 2 items; it holds 2 arrays.*"
        r"LSTMState\(hidden=h, cell=c\).*Flax \(c, h\)",
    ):
        model.apply(variables, (zeros, zeros), X)


@pytest.mark.parametrize("field", ["units", "num_layers", "unroll", "remat_chunk"])
def test_booleans_are_no_counts(field):
    # unroll=True means every step (Keras's meaning); False is no count there either.
    kwargs = {"units": 3, field: False if field == "unroll" else True}
    with pytest.raises(
        ValueError, match=rf"{field}: expected .*an integer >= 1; received {kwargs[field]}"
    ):
        BandedLSTM(**kwargs)


def test_float64_inputs_without_x64_run_in_float32_without_a_warning():
    # filterwarnings = error: a UserWarning from a dtype cast would fail this test.
    state, y = apply(inputs=X.astype(np.float64))
    assert y.dtype == jnp.float32 and state[0].cell.dtype == jnp.float32
    _, expected = lstm_reference(params_from_variables(VARIABLES), X)
    np.testing.assert_allclose(y, expected, atol=2e-5)
