"""Checkpoints damaged for real (a file deleted, truncated or bit-flipped, a save killed
with SIGKILL): restore falls back to the newest intact one, says so, and keeps stderr quiet."""

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training.train_state import TrainState

from banded_rnn import BandedLSTM
from banded_rnn.training import Checkpointer, ChunkStream, fit, make_train_step

from helpers import (
    ADAM,
    ROOT,
    data_file,
    mse,
    new_train_state,
    random_inputs,
    random_variables,
    restore,
    root_node,
    run_script,
    save_steps,
    saved_values,
    script_command,
    script_env,
    templates,
)

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a save not yet finished
NOISE = ("Traceback", "Event loop is closed", "absl", "asyncio", "tensorstore", "orbax")


def quoted(path: Path) -> str:
    return re.escape(str(path))


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in NOISE)]


def assert_restored_step(restored, step: int) -> None:
    """``restored`` holds exactly what was saved at ``step``."""
    train_state, state, rng = saved_values(step)
    assert int(restored.train_state.step) == step
    for got, want in [(restored.train_state.params, train_state.params),
                      (restored.train_state.opt_state, train_state.opt_state),
                      (restored.state, state)]:  # fmt: skip
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Checkpoints of steps 1, 2 and 3, to copy and damage."""
    directory = tmp_path_factory.mktemp("pristine") / "run"
    save_steps(directory, [1, 2, 3])
    return directory


def copy_of(pristine: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    shutil.copytree(pristine, directory)
    return directory


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip(path: Path) -> None:
    flip_byte(path, path.stat().st_size // 8)


def read_plainly(step_directory: Path):
    """What orbax alone reads from a checkpoint (no checks): its items, or the error."""
    train_state, state, rng = templates()
    items = Checkpointer._items(train_state, state, rng, None)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, items)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(step_directory / "default", abstract)
    except Exception as error:
        return error


@pytest.mark.parametrize(
    "damage", [delete, truncate, flip], ids=["deleted", "truncated", "flipped"]
)
def test_restore_falls_back_past_a_damaged_newest_checkpoint(pristine, tmp_path, capfd, damage):
    directory = copy_of(pristine, tmp_path)
    damage(data_file(directory / "3"))
    with pytest.warns(
        UserWarning,
        match=rf"Checkpointer: the checkpoint of step 3 in {quoted(directory)} is damaged "
        rf"\(.+\); moved it to {quoted(directory / 'damaged' / '3')}, restoring step 2\.",
    ):
        restored, steps = restore(directory)
    assert_restored_step(restored, 2)
    assert steps == [1, 2] and not (directory / "3").exists()
    assert (directory / "damaged" / "3" / "default").is_dir()  # moved, not deleted
    assert noise(capfd.readouterr().err) == []
    # The damage is real: orbax alone fails, or reads other values than were saved.
    plain = read_plainly(directory / "damaged" / "3")
    if not isinstance(plain, Exception):
        saved = jax.tree.leaves(saved_values(3)[0].params)
        pairs = zip(jax.tree.leaves(plain["params"]), saved, strict=True)
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def test_bit_flips_are_caught_by_the_checksum_or_the_finite_check(pristine, tmp_path):
    """A flipped byte in a zstd chunk is read back silently (no checksum in orbax's data):
    as other finite numbers (the checksum catches them) or as NaN or inf."""
    size = data_file(pristine / "3").stat().st_size
    reasons = []
    for i, offset in enumerate(range(size // 16, size // 2, size // 16)):
        directory = copy_of(pristine, tmp_path / str(i))
        flip_byte(data_file(directory / "3"), offset)
        plain = read_plainly(directory / "3")
        if isinstance(plain, Exception):
            continue  # not silent
        with pytest.warns(UserWarning, match=r"step 3 .* is damaged \((.+)\)") as caught:
            restored, _ = restore(directory)
        assert_restored_step(restored, 2)
        reasons.append(str(caught[0].message))
    assert any("differ from their checksum" in reason for reason in reasons), reasons


def test_a_damaged_explicit_step_raises_and_stays(pristine, tmp_path):
    directory = copy_of(pristine, tmp_path)
    truncate(data_file(directory / "3"))
    with pytest.raises(
        ValueError, match=rf"the checkpoint of step 3 in {quoted(directory)} is damaged: "
    ):
        restore(directory, step=3)
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint of step 7 in {quoted(directory)}"):
        restore(directory, step=7)
    restored, steps = restore(directory, step=2)
    assert_restored_step(restored, 2)
    assert steps == [1, 2, 3] and not (directory / "damaged").exists()


def test_all_damaged_raises_and_moves_nothing(pristine, tmp_path):
    directory = copy_of(pristine, tmp_path)
    delete(data_file(directory / "3"))
    truncate(data_file(directory / "2"))
    (directory / "1" / "default" / "_METADATA").unlink()
    message = (
        rf"no checkpoint in {quoted(directory)} can be restored, all are damaged: "
        r"step 3: .+; step 2: .+; step 1: .+\. Nothing was moved or deleted"
    )
    with pytest.raises(ValueError, match=message):
        restore(directory)
    with Checkpointer(directory) as checkpointer:  # so the next run fails the same way
        assert checkpointer.all_steps() == [1, 2, 3]
    assert not (directory / "damaged").exists()


def test_a_template_of_other_shapes_is_no_damage(pristine, tmp_path):
    directory = copy_of(pristine, tmp_path)
    train_state, state, rng = templates()
    train_state = train_state.replace(params={**train_state.params, "b": jnp.zeros(33)})
    with Checkpointer(directory) as checkpointer:
        message = (
            r"step 3 .* does not match the given train_state, state, rng and stream: "
            r".*params/b: \(32,\) saved, \(33,\) given"
        )
        with pytest.raises(ValueError, match=message):
            checkpointer.restore(train_state, state, rng)
        assert checkpointer.all_steps() == [1, 2, 3]


def test_saving_past_a_damaged_step_keeps_the_good_checkpoints(pristine, tmp_path):
    directory = copy_of(pristine, tmp_path)
    truncate(data_file(directory / "3"))
    with Checkpointer(directory, max_to_keep=3) as checkpointer:
        with pytest.warns(UserWarning, match="step 3 .* is damaged"):
            assert_restored_step(checkpointer.restore(*templates()), 2)
        assert checkpointer.all_steps() == [1, 2]  # the damaged one no longer counts
        checkpointer.save(*saved_values(3))  # the same step number again
        assert checkpointer.all_steps() == [1, 2, 3]  # nothing deleted for it
        assert_restored_step(checkpointer.restore(*templates(), step=3), 3)  # the new one
        for step in (4, 5):
            checkpointer.save(*saved_values(step))
        assert checkpointer.all_steps() == [3, 4, 5]
        assert_restored_step(checkpointer.restore(*templates()), 5)
    assert sorted(os.listdir(directory / "damaged")) == ["3"]
    # Damaged again at the same step: kept too, under another name.
    truncate(data_file(directory / "5"))
    with pytest.warns(UserWarning, match=rf"moved it to {quoted(directory / 'damaged' / '5')}"):
        assert_restored_step(restore(directory)[0], 4)


SCRIPTS = Path(__file__).parent / "scripts"


def test_a_save_killed_midway_leaves_the_newest_complete_checkpoint(tmp_path):
    """A child saving in a loop is killed (SIGKILL) a random moment into a save, a few
    times over: each time the newest complete checkpoint restores, and the half-written
    one (orbax's temporary directory) neither counts nor stays."""
    directory, rng, half_written = tmp_path / "run", random.Random(0), 0
    for _ in range(3):
        with open(tmp_path / "errors", "w") as errors:
            child = subprocess.Popen(
                script_command(SCRIPTS / "checkpoint_in_a_loop.py", directory),
                stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT, env=script_env(),
            )  # fmt: skip
        lines = []
        while len(lines) < 3:  # at least two saves complete, then into a third
            line = child.stdout.readline()
            assert line, (tmp_path / "errors").read_text()
            lines.append(line)
        time.sleep(rng.uniform(0.0, 0.03))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        leftovers = [p.name for p in directory.iterdir() if TMP_SUFFIX in p.name]
        half_written += bool(leftovers)
        with Checkpointer(directory, max_to_keep=2) as checkpointer:
            steps = checkpointer.all_steps()
            assert steps and steps[-1] >= int(lines[-2].split()[1])
            assert_restored_step(checkpointer.restore(*templates()), steps[-1])
        for name in leftovers:  # orbax removes them when opening the directory, in a thread
            deadline = time.monotonic() + 10
            while (directory / name).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (directory / name).exists()
    assert half_written, "no kill landed while a save was being written"


def test_a_damaged_checkpoint_leaves_stderr_quiet(tmp_path):
    """In a fresh process, whose whole stderr is seen: no tracebacks of tensorstore
    callbacks into orbax's closed event loop, no orbax logs, even a while later."""
    done = run_script(SCRIPTS / "restore_damaged_checkpoints.py", tmp_path / "run", timeout=120)
    assert done.stdout.split() == ["1", "[1]", "2"]
    assert [line for line in done.stderr.splitlines() if "xla_bridge" not in line] == []


# fit resuming through a damaged checkpoint: a tiny model, as in test_training_loop.
BANDS, FEATURES, UNITS, CHUNK = 2, 2, 3, 4
LENGTHS = [8, 4, 12, 8]
INPUTS = [random_inputs(100 + i, (BANDS, t, FEATURES)) for i, t in enumerate(LENGTHS)]
TARGETS = [random_inputs(200 + i, (BANDS, t, UNITS)) for i, t in enumerate(LENGTHS)]
MODEL = BandedLSTM(UNITS)
VARIABLES = random_variables(MODEL, FEATURES, seed=4)
STEP = make_train_step(mse)


def stream():
    return ChunkStream(INPUTS, TARGETS, batch_size=2, chunk_length=CHUNK, seed=1)


def test_fit_resumes_through_a_damaged_newest_checkpoint(tmp_path, capfd):
    kwargs = dict(rng=jax.random.key(7), progress=False)
    full = fit(STEP, new_train_state(MODEL, VARIABLES, ADAM), stream(), num_steps=10, **kwargs)
    with Checkpointer(tmp_path / "run") as checkpointer:
        fit(STEP, new_train_state(MODEL, VARIABLES, ADAM), stream(), num_steps=6,
            checkpointer=checkpointer, checkpoint_every=2, **kwargs)  # fmt: skip
        assert checkpointer.all_steps() == [2, 4, 6]
    path = root_node(tmp_path / "run" / "6")
    flip_byte(path, path.stat().st_size // 2)
    with Checkpointer(tmp_path / "run") as checkpointer:
        with pytest.warns(UserWarning, match=r"step 6 .* is damaged .* restoring step 4"):
            resumed = fit(STEP, new_train_state(MODEL, VARIABLES, ADAM), stream(), num_steps=10,
                          checkpointer=checkpointer, checkpoint_every=2, **kwargs)  # fmt: skip
        assert checkpointer.all_steps() == [6, 8, 10]
    np.testing.assert_array_equal(resumed.history["step"], np.arange(5, 11))
    np.testing.assert_array_equal(resumed.history["loss"], full.history["loss"][4:])
    for a, b in zip(jax.tree.leaves(resumed.train_state), jax.tree.leaves(full.train_state),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert noise(capfd.readouterr().err) == []


def test_infinities_in_the_optimiser_state_are_no_damage(tmp_path):
    """Some optimisers keep an infinity by design (reduce_on_plateau's best loss so
    far, before the first): only the parameters and the carried state must be finite."""
    tx = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau())
    train_state, state, rng = saved_values(1)
    train_state = TrainState.create(apply_fn=None, params=train_state.params, tx=tx).replace(step=1)
    assert any(np.isinf(np.asarray(leaf)).any() for leaf in jax.tree.leaves(train_state.opt_state))
    with Checkpointer(tmp_path / "run") as checkpointer:
        checkpointer.save(train_state, state, rng)
        checkpointer.save(train_state.replace(step=2), state, rng)
        restored = checkpointer.restore(train_state, state, jax.random.key(99))
        assert int(restored.train_state.step) == 2 and checkpointer.all_steps() == [1, 2]
    for a, b in zip(jax.tree.leaves(restored.train_state.opt_state),
                    jax.tree.leaves(train_state.opt_state), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
