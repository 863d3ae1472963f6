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
