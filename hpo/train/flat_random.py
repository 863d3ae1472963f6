"""Keras' random initializers on JAX without a compilation per weight shape: a shape in,
the same values out, drawn as a flat array of one of a few sizes.

JAX compiles its random draws (`uniform`, `normal`, `truncated_normal`) once per shape,
and a model of a new width has new weight shapes: drawing a 2-layer LSTM's initial
weights cost 2.5 s of compilation, more than its train step. JAX's counter-based
generator draws element by element (each value from the key and its flat index), so
the first n values of a longer flat draw, reshaped, are the draw: `drawing()` makes
Keras draw that way, from sizes rounded up to a power of two, and does the elementwise
scaling Keras does after a draw in NumPy, in the same float32 arithmetic.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import numpy as np

_MIN_SIZE = 256
_exact: bool | None = None


def _size(n: int) -> int:
    return max(_MIN_SIZE, 1 << max(0, n - 1).bit_length())


def _flat(draw: Callable[..., Any], key: Any, shape: tuple[int, ...], dtype: str, **kwargs: Any) -> np.ndarray:
    n = math.prod(shape)
    return np.asarray(draw(key, shape=(_size(n),), dtype=dtype, **kwargs))[:n].reshape(shape)


def _is_exact() -> bool:
    """Whether this JAX draws element by element (its partitionable threefry does; the
    older generator does not): checked once, on shapes of three ranks."""
    global _exact
    if _exact is None:
        import jax

        key = jax.random.key(7)
        _exact = all(np.array_equal(np.asarray(draw(key, shape=shape, dtype="float32")),
                                    _flat(draw, key, shape, "float32"))
                     for draw in (jax.random.uniform, jax.random.normal)
                     for shape in ((3, 5), (1, 40), (6, 7, 2)))
    return _exact


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """While in it, Keras' JAX `uniform`, `normal` and `truncated_normal` of float32 draw
    flat (`_flat`); other dtypes, and a JAX that does not draw element by element, are
    left as they are."""
    from keras.src.backend.jax import random as keras_random

    if not _is_exact():
        yield
        return
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
        return _flat(jax.random.uniform, key, tuple(shape), "float32", minval=minval, maxval=maxval)

    def scaled(name: str, **bounds: float) -> Callable[..., Any]:
        draw = getattr(jax.random, name)

        def sample(shape: Any, mean: float = 0.0, stddev: float = 1.0, dtype: Any = None, seed: Any = None) -> Any:
            key = keras_random.jax_draw_seed(seed)
            if not flat(dtype, key):
                return draw(key, shape=shape, dtype=dtype or keras_random.floatx(), **bounds) * stddev + mean
            values = _flat(draw, key, tuple(shape), "float32", **bounds)
            # Keras' `sample * stddev + mean`: a float32 product, then a float32 sum.
            return values * np.float32(stddev) + np.float32(mean)

        return sample

    replacements = {"uniform": uniform, "normal": scaled("normal"),
                    "truncated_normal": scaled("truncated_normal", lower=-2.0, upper=2.0)}
    try:
        for name, function in replacements.items():
            setattr(keras_random, name, function)
        yield
    finally:
        for name, function in originals.items():
            setattr(keras_random, name, function)
