"""Initial weights: a Keras model, its build and R seeds in; each replica's initial variables, exactly
those `build()` makes after `keras.utils.set_random_seed(seed)`, out, drawn by re-running each
initializer for all seeds rather than building R models.
"""

from __future__ import annotations

import copy
import functools
import random
from typing import Any, Callable

import numpy as np


# How many of Python's `random` draws after `set_random_seed` are searched for the seeds
# of a model's initializers and seed generators.
_MAX_DRAWS = 4096
# From this many seeds on, initial weights are drawn for all seeds in one batched call.
_BATCHED_DRAWS_FROM = 128


def _seed_of(variable: Any, initializer: Any) -> int | None:
    # The seed a variable's values were drawn from when Keras built it: a random
    # initializer's integer seed, or a SeedGenerator state's first element.
    seed = getattr(initializer, "seed", None)
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    if variable.name == "seed_generator_state":
        return int(np.asarray(variable.value)[0])
    return None


def _draws(seed: int, count: int) -> list[int]:
    # keras.random.make_default_seed, after keras.utils.set_random_seed(seed).
    rng = random.Random(seed)
    return [rng.randint(1, int(1e9)) for _ in range(count)]


class Draws:
    """Draws a model's initial variables for R seeds, as Keras would under each.

    Under `set_random_seed(seed)` Keras gives each random initializer (and each dropout
    seed generator) the next of Python's `random` draws; so a variable's values under
    any seed follow from its initializer and its position among those draws. For a few
    seeds each initializer runs per seed (its ops are compiled already, by the native
    build); for many (1000 seeds took 4.9 s that way on an H100) it runs as one
    compiled loop over the seeds' keys, which costs a compilation per seed count.
    """

    def __init__(self, model: Any, initializers: list, seed: int) -> None:
        draws = {d: i for i, d in enumerate(_draws(seed, _MAX_DRAWS))}
        # For each variable, which draw seeded it (None: not random, or seeded by the
        # user and so the same under every seed).
        self.index = [draws.get(_seed_of(v, init)) for v, init in zip(model.variables, initializers)]
        self.count = max((i for i in self.index if i is not None), default=-1) + 1
        self.initializers = initializers
        self._batched: list | None = None
        self._batched_ok: bool | None = None

    def values(self, template: Any, seeds: list[int]) -> list[Any]:
        """`template`'s variables, each stacked over `seeds` (leading axis R)."""
        draws = np.array([_draws(s, self.count) for s in seeds], dtype=np.int64).reshape(len(seeds), self.count)
        if len(seeds) >= _BATCHED_DRAWS_FROM and self._batched_ok is not False:
            values = self._stacked(template, draws, batched=True)
            if self._batched_ok is None:
                # Batched linear algebra (the orthogonal initializer's QR) may round
                # differently; use it only where it gives the per-seed values.
                one = self._stacked(template, draws[:1], batched=False)
                self._batched_ok = all(np.allclose(np.asarray(a)[0], b[0], rtol=1e-6, atol=1e-7)
                                       for a, b in zip(values, one))
            if self._batched_ok:
                return values
        return self._stacked(template, draws, batched=False)

    def _stacked(self, template: Any, draws: np.ndarray, batched: bool) -> list[Any]:
        """Each variable over the rows of `draws` (one row per seed): a random one by its
        initializer, seed by seed or (`batched`) as one compiled loop over the seeds."""
        import jax
        from keras.src.backend import random_seed_dtype

        if batched and self._batched is None:
            # A loop on the device rather than a vmap: a batched QR (the orthogonal
            # initializer's) rounds differently from the per-seed one on a GPU.
            self._batched = [None if i is None or v.name == "seed_generator_state"
                             else jax.jit(functools.partial(jax.lax.map, _drawer(init, v)))
                             for v, init, i in zip(template.variables, self.initializers, self.index)]
        values = []
        for k, (v, initializer, i) in enumerate(zip(template.variables, self.initializers, self.index)):
            value = np.asarray(v.value)
            if i is None:
                values.append(np.broadcast_to(value, (len(draws), *value.shape)))
                continue
            # Keras' seed for this variable under each seed, as [seed, 0].
            keys = np.stack([draws[:, i], np.zeros(len(draws), np.int64)], axis=1)
            if v.name == "seed_generator_state":
                values.append(keys.astype(value.dtype))
            elif batched:
                values.append(self._batched[k](keys.astype(random_seed_dtype())))
            else:
                draw = _drawer(initializer, v)
                values.append(np.stack([np.asarray(draw(int(seed))) for seed in draws[:, i]]))
        return values


def _drawer(initializer: Any, variable: Any) -> Callable[[Any], Any]:
    shape, dtype = tuple(variable.shape), variable.dtype

    def draw(key: Any) -> Any:
        # An integer seed, or a key array (Keras' JAX random ops take one wherever they
        # take an integer seed).
        init = copy.copy(initializer)
        init.seed = key
        return init(shape, dtype=dtype)

    return draw


def variable_values(model: Any) -> tuple[list, list, list, list]:
    return ([np.asarray(v.value) for v in model.trainable_variables],
            [np.asarray(v.value) for v in model.non_trainable_variables],
            [np.asarray(v.value) for v in model.optimizer.variables],
            [np.asarray(v.value) for v in model.metrics_variables])


def initial_state(template: Any, build: Callable[[], Any], seeds: list[int], draws: Draws | None,
                   sample: tuple) -> tuple[list, list, list, list]:
    """The replicas' initial state, stacked over seeds: replica r's is that of `build()`
    under `seeds[r]`.

    Building R whole Keras models only to read their weights dominates a trial at many
    seeds (44 s of 47 for 1000 seeds on an H100); instead the initializers are re-run
    for all seeds at once (`Draws`). Where that was found not to give the native
    weights, every replica is built natively.
    """
    import jax

    if draws is None:
        states = [variable_values(template)]
        states += [variable_values(build_native(build, seed, sample)[0]) for seed in seeds[1:]]
        return jax.tree.map(lambda *leaves: np.stack(leaves), *states)
    values = dict(zip((id(v) for v in template.variables), draws.values(template, seeds)))
    _, _, optimizer_vars, metric_vars = variable_values(template)
    repeat = lambda value: np.broadcast_to(value, (len(seeds), *value.shape))  # noqa: E731
    return ([values[id(v)] for v in template.trainable_variables],
            [values[id(v)] for v in template.non_trainable_variables],
            [repeat(v) for v in optimizer_vars], [repeat(v) for v in metric_vars])


def build_native(build: Callable[[], Any], seed: int, sample: tuple, values: bool = True) -> tuple[Any, list]:
    """`build()` under the seed, built for `sample`; with the initializer that drew each
    of its variables (in `model.variables` order, None where none did). With `values`
    False every variable starts at zero instead, drawing nothing: for a model whose
    structure is wanted and whose state comes from elsewhere (a width bucket's twin).

    Keras forgets a variable's initializer once it has run, so the build is watched.
    """
    import keras
    from keras.src.backend.common.variables import Variable

    used: dict[int, Any] = {}
    initialize = Variable._initialize_with_initializer

    def watched(variable: Any, initializer: Any) -> Any:
        used[id(variable)] = initializer
        if not values:
            return initialize(variable, _filled(0))
        return initialize(variable, _constant_in_numpy(initializer, variable.dtype) or initializer)

    keras.utils.set_random_seed(seed)
    Variable._initialize_with_initializer = watched
    try:
        model = build()
        disable_cudnn(model)
        model._symbolic_build(data_batch=sample)
    finally:
        Variable._initialize_with_initializer = initialize
    return model, [used.get(id(v)) for v in model.variables]


def _filled(value: float) -> Callable[..., Any]:
    """An initializer of `value` everywhere, made in NumPy and put on the device as it is."""
    import jax

    return lambda shape, dtype=None: jax.device_put(np.full(shape, value, dtype=dtype))


def _constant_in_numpy(initializer: Any, dtype: str) -> Callable[..., Any] | None:
    """Keras' float Zeros, Ones and Constant as the same values made in NumPy and put on
    the device as they are: on JAX each new shape of theirs costs a compilation (a bias,
    each optimizer slot), 20-30 ms apiece, and so does handing JAX a NumPy array of a new
    shape (`jnp.asarray` stages it), about 10 ms; `jax.device_put` compiles nothing."""
    from keras.src.initializers import Constant, Ones, Zeros

    if type(initializer) not in (Zeros, Ones, Constant) or not str(dtype).startswith("float"):
        return None
    value = {Zeros: 0.0, Ones: 1.0}.get(type(initializer), getattr(initializer, "value", None))
    if not isinstance(value, (int, float)):
        return None
    return _filled(value)


def checked_draws(model: Any, initializers: list, seed: int) -> Draws | None:
    """The model's `Draws` (for `model`, built under `seed`), or None where its weights
    cannot be re-drawn: a variable drawn at random by anything but Keras' own random
    initializers (a NumPy lambda, a custom initializer), or re-drawing under `seed` does
    not give the model's own weights (e.g. a layer overwrote its weights after creating
    them)."""
    if not all(_redrawable(v, init) for v, init in zip(model.variables, initializers)):
        return None
    draws = Draws(model, initializers, seed)
    derived = draws.values(model, [seed])
    return draws if all(np.array_equal(np.asarray(v.value), d[0]) for v, d in zip(model.variables, derived)) else None


def _redrawable(variable: Any, initializer: Any) -> bool:
    """Whether the variable's values follow from its initializer and the seed: Keras'
    random initializers with an integer seed, seed generators, and any initializer that
    gives the same values under two global seeds (Zeros, LSTM's unit-forget bias)."""
    import keras
    from keras.src.initializers.random_initializers import RandomInitializer

    if variable.name == "seed_generator_state":
        return True
    if isinstance(initializer, RandomInitializer) and type(initializer).__module__.startswith("keras."):
        # A seed generator as seed advances with every call and cannot be replayed.
        return isinstance(initializer.seed, int)
    if not callable(initializer):
        return False
    if _constant_in_numpy(initializer, variable.dtype) is not None:
        return True
    shape, dtype = tuple(variable.shape), variable.dtype
    drawn = []
    for probe in (1, 2):
        keras.utils.set_random_seed(probe)
        drawn.append(np.asarray(initializer(shape, dtype=dtype)))
    return np.array_equal(drawn[0], drawn[1])


def disable_cudnn(model: Any) -> None:
    # cuDNN's fused RNN primitive has no batching rule, so under vmap the recurrent
    # layers must take Keras' generic scan; on a CPU it changes nothing.
    for layer in model._flatten_layers():
        if hasattr(layer, "use_cudnn"):
            layer.use_cudnn = False
