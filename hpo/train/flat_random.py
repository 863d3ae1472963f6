"""Keras' random initializers on JAX without a compilation per weight shape: a shape in,
the same values out, drawn as a flat array of one of a few sizes.

JAX compiles its random draws (`uniform`, `normal`, `truncated_normal`) once per shape,
and a model of a new width has new weight shapes: drawing a 2-layer LSTM's initial
weights cost 2.5 s of compilation, more than its train step. JAX's counter-based
generator draws element by element (each value from the key and its flat index), so
the first n values of a longer flat draw, reshaped, are the draw: `drawing()` makes
Keras draw that way, from sizes rounded up to a power of two and at least `_MIN_SIZE`,
and does the elementwise scaling Keras does after a draw in NumPy, in the same float32
arithmetic.

The orthogonal initializer (every recurrent kernel's) runs its QR, diagonal, sign,
product and transpose as one compiled program per shape instead of five: 89 ms instead
of 275 ms for each new recurrent width, with the same values bit for bit (the same
operations; a sign is exact, and so is a product by ±1).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Iterator

import numpy as np

# Each size is a program of its own (about 0.2 s to compile on a CPU); a draw of 4096
# values costs 0.35 ms against 0.1 ms for 256. A small model's weights (256 to 4096
# values each: the reference LSTM's up to 32 units) then draw from one size.
_MIN_SIZE = 4096
_exact: bool | None = None


def _size(n: int) -> int:
    return max(_MIN_SIZE, 1 << max(0, n - 1).bit_length())


def _flat(draw: Callable[..., Any], key: Any, shape: tuple[int, ...], dtype: str, **kwargs: Any) -> np.ndarray:
    n = math.prod(shape)
    return np.asarray(draw(key, shape=(_size(n),), dtype=dtype, **kwargs))[:n].reshape(shape)


def _is_exact() -> bool:
    """Whether this JAX draws element by element (its partitionable threefry does; the
    older generator, which pairs the first half of a draw's counters with the second,
    does not): checked once, on one shape of rank 3 against the smallest flat draw.
    Each shape checked is a compilation of each draw, about 0.1 s in every process's
    first build (the spec check's), so one shape, and a flat size that trials draw from
    anyway."""
    global _exact
    if _exact is None:
        import jax

        key = jax.random.key(7)
        _exact = all(np.array_equal(np.asarray(draw(key, shape=(6, 7, 2), dtype="float32")),
                                    _flat(draw, key, (6, 7, 2), "float32"))
                     for draw in (jax.random.uniform, jax.random.normal))
    return _exact


# `drawing()` patches Keras process-wide: one thread at a time (builds on two threads
# would restore each other's patches out of order).
_drawing_lock = threading.RLock()


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """While in it, Keras' JAX `uniform`, `normal` and `truncated_normal` of float32 draw
    flat (`_flat`), and its `Orthogonal` initializer runs as one program per shape
    (`_orthogonalizer`); other dtypes and backends, and a JAX that does not draw element
    by element, are left as they are. Held by one thread at a time."""
    with _drawing_lock:
        with _drawing():
            yield


@contextlib.contextmanager
def _drawing() -> Iterator[None]:
    import keras

    # On another backend (the spec check builds its model there too) Keras' own draws.
    if keras.backend.backend() != "jax" or not _is_exact():
        yield
        return
    from keras.src.backend.jax import random as keras_random

    import jax

    originals = {name: getattr(keras_random, name) for name in ("uniform", "normal", "truncated_normal")}

    def flat(dtype: Any, key: Any) -> bool:
        # Inside a trace (initial weights for many seeds in one compiled loop) the draw is
        # compiled once anyway; only a concrete float32 draw is made flat.
        return (dtype or keras_random.floatx()) == "float32" and not isinstance(key, jax.core.Tracer)

    def uniform(shape: Any, minval: float = 0.0, maxval: float = 1.0, dtype: Any = None, seed: Any = None) -> Any:
        key = keras_random.jax_draw_seed(seed)
        if not flat(dtype, key):
            return jax.random.uniform(key, shape=shape, dtype=dtype or keras_random.floatx(), minval=minval,
                                      maxval=maxval)
        # On the device already: JAX would compile a program per shape to move a NumPy
        # array there (`jnp.asarray` stages it), about 10 ms for every new weight shape.
        return jax.device_put(_flat(jax.random.uniform, key, tuple(shape), "float32", minval=minval,
                                    maxval=maxval))

    def scaled(name: str, **bounds: float) -> Callable[..., Any]:
        draw = getattr(jax.random, name)

        def sample(shape: Any, mean: float = 0.0, stddev: float = 1.0, dtype: Any = None, seed: Any = None) -> Any:
            key = keras_random.jax_draw_seed(seed)
            if not flat(dtype, key):
                return draw(key, shape=shape, dtype=dtype or keras_random.floatx(), **bounds) * stddev + mean
            values = _flat(draw, key, tuple(shape), "float32", **bounds)
            # Keras' `sample * stddev + mean`: a float32 product, then a float32 sum.
            return jax.device_put(values * np.float32(stddev) + np.float32(mean))

        return sample

    replacements = {"uniform": uniform, "normal": scaled("normal"),
                    "truncated_normal": scaled("truncated_normal", lower=-2.0, upper=2.0)}
    from keras.src.initializers.random_initializers import Orthogonal

    keras_orthogonal = Orthogonal.__call__

    def orthogonal(self: Any, shape: Any, dtype: Any = None) -> Any:
        # Keras' own steps, with everything after the draw in one program (`_orthogonalizer`).
        from keras.src import random as keras_ops_random

        # Keras' own where the gain is not a plain number (a static argument of the
        # program must hash) or the seed is traced (many seeds in one compiled loop).
        if (len(shape) < 2 or (dtype or keras_random.floatx()) != "float32"
                or not isinstance(self.gain, (int, float, np.generic)) or isinstance(self.seed, jax.core.Tracer)):
            return keras_orthogonal(self, shape, dtype)
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = keras_ops_random.normal((max(cols, rows), min(cols, rows)), seed=self.seed, dtype=dtype)
        return _orthogonalizer()(a, shape=tuple(shape), transpose=rows < cols, gain=self.gain)

    try:
        for name, function in replacements.items():
            setattr(keras_random, name, function)
        Orthogonal.__call__ = orthogonal
        yield
    finally:
        for name, function in originals.items():
            setattr(keras_random, name, function)
        Orthogonal.__call__ = keras_orthogonal


@functools.cache
def _orthogonalizer() -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("shape", "transpose", "gain"))
    def orthogonalize(a: Any, shape: tuple, transpose: bool, gain: float) -> Any:
        """Keras' `Orthogonal` after its normal draw `a`: Q of `a`'s QR with the signs of R's
        diagonal, transposed where the shape is wider than tall, reshaped, times the gain."""
        q, r = jnp.linalg.qr(a, mode="reduced")
        q = q * jnp.sign(jnp.diag(r))
        if transpose:
            q = jnp.transpose(q)
        return gain * jnp.reshape(q, shape)

    return orthogonalize
