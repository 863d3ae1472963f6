"""Width buckets: a trial's model of `units` u runs in the compiled program of a twin of
width U >= u (the bucket), its extra units' weights zero, so trials of several widths share one
program. Native and twin models in; the padding of their variables and dropout masks out.

Why each replica still computes what its real width computes: a padded unit's incoming
weights, bias and outgoing weights are 0, so its pre-activation is 0 and, for an activation
with f(0) = 0 (tanh, relu, ...: LSTM's candidate, GRU's, SimpleRNN's, Dense's), so is its
output and its cell state; nothing it feeds changes, and its weights' gradients are exactly
0, so no optimizer (Adam, RMSprop, SGD with momentum, L1/L2, clipping) ever moves them. The
real units' sums gain only zero terms: equal to float32 rounding (XLA may add in another
order). A dropout mask over a padded axis is drawn as one flat array and gathered at the
native positions (JAX draws element by element, `flat_random`), so each replica sees the
masks its native model would.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

# Layers whose computation is known to keep padded units at zero (with an activation
# that maps 0 to 0) and whose only random draws are dropout masks of their inputs or units.
_PADDABLE = {"InputLayer", "Embedding", "Flatten", "Dense", "Dropout", "LSTM", "GRU", "SimpleRNN", "LSTMCell",
             "GRUCell", "SimpleRNNCell"}
_RECURRENT = {"LSTM", "GRU", "SimpleRNN"}


@dataclass(frozen=True)
class Bucket:
    """A trial's width (`units`), the width its program is compiled at (`padded`),
    `build(width)`: a new compiled model of the trial at a width, and the widths the
    search space has (`widths`; empty: unknown)."""

    units: int
    padded: int
    build: Callable[[int], Any]
    widths: tuple[int, ...] = ()

    @property
    def narrower(self) -> int | None:
        """The widest width below `units` that the space has and that runs in this
        bucket too, if any: a trial as wide as its bucket compiles the bucket's program
        for it, so that a narrower trial later finds the program made."""
        # `padded` for the space's top: where `units` is its own bucket the two agree.
        below = [w for w in self.widths if w < self.units and bucket(w, self.padded) == self.padded]
        return max(below) if below else None


def bucket(units: int, high: int) -> int:
    """The width a model of `units` is compiled at: the next power of two, at most the
    search space's `high` (a wider program costs epochs: an LSTM's epoch grows about
    linearly with its width, measured 6 ms at 4 units to 37 ms at 32)."""
    return max(units, min(1 << max(units - 1, 0).bit_length(), high))


def keeps_zero(activation: Any) -> bool:
    """Whether an activation maps 0 to 0 (a padded unit then stays 0)."""
    import keras

    try:
        return float(keras.activations.get(activation)(np.zeros((1,), np.float32))[0]) == 0.0
    except Exception:  # noqa: BLE001 - an activation we cannot evaluate is not padded
        return False


class Padding:
    """How a native model's state sits in its twin's: for each variable (trainable,
    non-trainable, optimizer, metrics, as the engine's state lists them), for each axis,
    None (the same) or the twin positions of the native entries (a width of k blocks of
    u, each block at a multiple of U: LSTM's four gates)."""

    def __init__(self, index: list[list[tuple]], shapes: list[list[tuple]], width: int) -> None:
        self.index, self.shapes, self.width = index, shapes, width

    @classmethod
    def between(cls, native: Any, twin: Any, units: int, padded: int) -> "Padding | None":
        """The padding of `native` (width `units`) in `twin` (width `padded`), or None
        where a variable's shape is not k blocks of the width, or a layer is not one
        whose padded units are known to stay zero."""
        if [type(layer).__name__ for layer in native._flatten_layers()] != \
                [type(layer).__name__ for layer in twin._flatten_layers()]:
            return None
        if any(type(layer).__name__ not in _PADDABLE and layer is not twin for layer in twin._flatten_layers()):
            return None
        index, shapes = [], []
        for ns, ts in zip(_state_variables(native), _state_variables(twin)):
            if len(ns) != len(ts):
                return None
            row = []
            for n, t in zip(ns, ts):
                axes = _axes(tuple(n.shape), tuple(t.shape), units, padded)
                if axes is None:
                    return None
                row.append(axes)
            index.append(row)
            shapes.append([tuple(t.shape) for t in ts])
        return cls(index, shapes, units)

    def pad(self, state: tuple[list, ...]) -> tuple[list, ...]:
        """The native state (each array with a leading replica axis) in the twin's shapes."""
        out = []
        for arrays, index, shapes in zip(state, self.index, self.shapes):
            row = []
            for value, axes, shape in zip(arrays, index, shapes):
                value = np.asarray(value)
                if all(a is None for a in axes):
                    row.append(value)
                    continue
                full = np.zeros((value.shape[0], *shape), value.dtype)
                full[(slice(None), *_grid(axes, shape))] = value
                row.append(full)
            out.append(row)
        return tuple(out)

    def unpad(self, kind: int, position: int, value: np.ndarray) -> np.ndarray:
        """One variable's native entries (no replica axis) of its twin value; `kind`
        indexes the state lists (0 trainable, 1 non-trainable)."""
        axes, shape = self.index[kind][position], self.shapes[kind][position]
        if all(a is None for a in axes):
            return value
        return value[_grid(axes, shape)]


def _state_variables(model: Any) -> list[list[Any]]:
    return [model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
            model.metrics_variables]


def _axes(native: tuple, twin: tuple, units: int, padded: int) -> tuple | None:
    if len(native) != len(twin):
        return None
    axes = []
    for n, t in zip(native, twin):
        if n == t:
            axes.append(None)
        elif n % units == 0 and t == n // units * padded:
            axes.append(np.concatenate([g * padded + np.arange(units) for g in range(n // units)]))
        else:
            return None
    return tuple(axes)


def _grid(axes: tuple, shape: tuple) -> tuple:
    return np.ix_(*[np.arange(size) if a is None else a for a, size in zip(axes, shape)])


class Masks:
    """Which dropout draws of a twin model run over a padded last axis: per seed generator
    (a Dropout layer's, a recurrent cell's), the twin widths that are padded."""

    def __init__(self, padded: dict[int, set[int]]) -> None:
        self.padded = padded

    @classmethod
    def between(cls, native: Any, twin: Any) -> "Masks | None":
        """The masks of `twin` paired with `native`'s (the same layers, a smaller width),
        or None where one twin width would be padded for one draw and not for another of
        the same generator (a cell whose input has as many features as the bucket's width)."""
        padded: dict[int, set[int]] = {}
        for n, t in zip(native._flatten_layers(), twin._flatten_layers()):
            kind = type(t).__name__
            if kind == "Dropout":
                generator, pairs = t.seed_generator, [(n.input.shape[-1], t.input.shape[-1])]
            elif kind in _RECURRENT:
                generator = t.cell.seed_generator
                pairs = [(n.input.shape[-1], t.input.shape[-1]), (n.cell.units, t.cell.units)]
            else:
                continue
            widths = {w for nw, w in pairs if nw != w}
            if widths & {w for nw, w in pairs if nw == w}:
                return None
            padded[id(generator)] = widths
        return cls(padded)


# The masks and real width of the program this thread is tracing.
_tracing = threading.local()


@contextlib.contextmanager
def tracing(masks: Masks | None, width: Any) -> Iterator[None]:
    """While a step is traced: dropout over `masks`' padded axes draws the native masks of
    a model of `width` units (traced)."""
    if masks is None:
        yield
        return
    _install()
    previous = getattr(_tracing, "active", None)
    _tracing.active = (masks, width)
    try:
        yield
    finally:
        _tracing.active = previous


_installed = False


def _install() -> None:
    """Route Keras' dropout (on the JAX backend) through `_padded_dropout`, once, for the
    draws this thread traces over a padded axis; every other draw is Keras' own."""
    global _installed
    if _installed:
        return
    from keras.src import backend

    original = backend.random.dropout
    _installed = True

    def dropout(inputs: Any, rate: Any, noise_shape: Any = None, seed: Any = None) -> Any:
        active = getattr(_tracing, "active", None)
        if active is not None and noise_shape is None:
            masks, width = active
            if inputs.shape[-1] in masks.padded.get(id(seed), ()):
                return _padded_dropout(inputs, rate, seed, width)
        return original(inputs, rate, noise_shape=noise_shape, seed=seed)

    backend.random.dropout = dropout


def _padded_dropout(inputs: Any, rate: Any, seed: Any, width: Any) -> Any:
    """Keras' dropout of `inputs` (last axis padded), with the mask a model of `width`
    units draws: element (row, j) of the native draw is element row * width + j of a
    flat draw."""
    import jax
    import jax.numpy as jnp
    from keras.src.backend.jax.random import jax_draw_seed

    if rate == 1.0:
        return jnp.zeros_like(inputs)
    if rate == 0.0:
        return inputs
    key = jax_draw_seed(seed)
    keep = 1.0 - rate
    *lead, size = inputs.shape
    rows = math.prod(lead)
    flat = jax.random.bernoulli(key, p=keep, shape=(rows * size,))
    cols = jnp.arange(size)
    at = jnp.where(cols < width, jnp.arange(rows)[:, None] * width + cols, 0)
    mask = flat[at].reshape(inputs.shape)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))
