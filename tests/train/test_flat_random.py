"""Keras' random initializers drawn without a compilation per weight shape give Keras' own
values, bit for bit; the orthogonal initializer compiles one program per new shape."""

import keras
import numpy as np
import pytest

from hpo.train import flat_random

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="flat draws are JAX's; "
                                                                          "this suite runs on HPO_BACKEND=tensorflow")

INITIALIZERS = [
    lambda seed: keras.initializers.GlorotUniform(seed=seed),
    lambda seed: keras.initializers.HeNormal(seed=seed),
    lambda seed: keras.initializers.LecunNormal(seed=seed),  # truncated normal
    lambda seed: keras.initializers.RandomNormal(mean=0.5, stddev=2.0, seed=seed),
    lambda seed: keras.initializers.Orthogonal(seed=seed),
    lambda seed: keras.initializers.Orthogonal(gain=2.0, seed=seed),
    lambda seed: keras.initializers.Orthogonal(gain=np.float32(1.3), seed=seed),
    lambda seed: keras.initializers.Orthogonal(gain=np.array(1.5), seed=seed),  # not hashable: Keras' own path
]


@pytest.mark.parametrize("make", INITIALIZERS)
@pytest.mark.parametrize("shape", [(13, 52), (52, 13), (7, 3, 5), (6, 6)])
def test_flat_draws_are_keras_own_values(make, shape):
    for seed in (1, 42):
        keras_own = np.asarray(make(seed)(shape, dtype="float32"))
        with flat_random.drawing():
            flat = np.asarray(make(seed)(shape, dtype="float32"))
        assert flat.dtype == keras_own.dtype and np.array_equal(flat, keras_own)


def test_the_orthogonal_initializer_compiles_one_program_per_new_shape():
    import jax

    from hpo.train.engine import CompileClock

    with flat_random.drawing():
        # Warm: the flat normal draw of 512 values, which (12, 40) below draws too.
        jax.block_until_ready(keras.initializers.Orthogonal(seed=3)((11, 44)))
        clock = CompileClock.now()
        jax.block_until_ready(keras.initializers.Orthogonal(seed=3)((12, 40)))
        new_shape = clock.since().programs
        clock = CompileClock.now()
        jax.block_until_ready(keras.initializers.Orthogonal(seed=4)((12, 40)))
        seen_shape = clock.since().programs
    assert new_shape == 1 and seen_shape == 0, (new_shape, seen_shape)


def test_the_spec_check_draws_its_models_weights_as_the_trials_do(caplog):
    """`hpo run` builds the model once before any trial (`check_model`); drawn flat, as a
    trial's are, a width never met compiles no random draw of its own shapes (each about
    0.1 s of every run's start-up, and the first trial then found none compiled)."""
    import logging

    import jax

    from hpo.specs.study import load_spec
    from hpo.train.models import check_first_params, check_model

    with flat_random.drawing():  # the flat draws themselves, compiled once per process
        keras.initializers.GlorotUniform(seed=1)((3, 4))
        keras.initializers.Orthogonal(seed=1)((8, 4))
    spec = load_spec("sine_lstm")
    params = {**check_first_params(spec), "units": 23, "layers": 2}
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        check_model(spec, params, (20, 1), 1, 400)
        jax.jit(lambda x: x * 3.0)(np.float32(1.0))  # a new function: compiled, so the log is read
    compiled = {m.split("(", 2)[1].split(")")[0] for m in caplog.messages if m.startswith("Compiling jit(")}
    assert "<lambda>" in compiled and not compiled & {"_uniform", "_normal", "_truncated_normal", "qr"}, compiled
