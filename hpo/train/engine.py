"""Vectorised seeds: a Keras model factory, arrays and R seeds in; R replicas of the model
trained as one `jax.vmap` program, one epoch per call, with per-replica logs out.

Works for any Keras model on the JAX backend: the compiled model's own pure `train_step`
and `test_step` (built on `stateless_call` and `optimizer.stateless_apply`) are batched
over a leading replica axis, one jitted step per batch. Each replica's initial weights
come from `initial`. Longer than most modules because the program is one piece: tracing
with hyperparameters as inputs, the cache of compiled epochs and the weighted steps that
give a short last batch no compilation of its own share the program's state.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from hpo.backend import available_cores
from hpo.train import buckets, flat_random, knobs
from hpo.train.initial import Draws, build_native, checked_draws, initial_state

# One compiled epoch per model configuration: a later trial with the same configuration
# (and batch shapes) reuses it, so it pays no tracing or compilation. Bounded, so a long
# study whose configurations keep changing does not accumulate compiled programs: the
# least recently used goes first, once the cache holds _CACHE_SIZE programs or their
# models' variables (each program keeps its model) would pass _CACHE_BYTES. An evicted
# program takes its traces and executables with it (JAX keys them on the program's own
# functions) once the trials using it, the running one and one built ahead, are done: a
# worker cycling through 16 configurations with room for 4 stayed flat. The thread that
# builds ahead and the one that trains (re-keying a program, `compile_numbers_in`) both
# change the cache, under `_programs_lock`.
_CACHE_SIZE = 8
_CACHE_BYTES = 512 * 2**20
_programs: dict[str, "_Program"] = {}
_programs_lock = threading.RLock()

# Structures whose numbers could not be traced as inputs (`knobs.Escaped`): their
# programs compile the numbers in, and their keys name them.
_numbers_compiled_in: set[str] = set()


@dataclass
class _Program:
    model: Any
    epoch: Callable[..., Any]
    # How each variable's initial values are drawn for R seeds at once; None where
    # re-drawing does not give the native weights and each replica is built natively.
    draws: "Draws | None"


class Replicas:
    """R replicas of one compiled Keras model, each as if fitted alone under its seed.

    Replica r starts from the weights (and dropout seed-generator state) of the model that
    `build()` returns after `keras.utils.set_random_seed(seeds[r])`, sees each epoch's
    training data in the order `model.fit(shuffle=True)` would draw under that seed
    (a fresh `np.random.permutation` per epoch, the last short batch included), and is
    validated batch by batch as `fit(validation_data=...)` does.

    Args:
        build: Returns a new, compiled Keras model (called under each replica's seed).
        seeds: One replica per seed.
        x, y: Training arrays; xv, yv: validation arrays.
        batch_size: Batch size for training and validation, as in `model.fit`.
    """

    def __init__(self, build: Callable[[], Any], seeds: list[int], x: np.ndarray, y: np.ndarray,
                 xv: np.ndarray, yv: np.ndarray, batch_size: int, bucket: buckets.Bucket | None = None) -> None:
        import jax

        self.seeds = list(seeds)
        self.batch_size = int(batch_size)
        sample = (x[: self.batch_size], y[: self.batch_size])
        # Initial weights drawn without a compilation per weight shape (`flat_random`).
        with flat_random.drawing():
            model, initializers = build_native(build, self.seeds[0], sample)
            program, self._padding = _bucket_program(model, bucket, self.seeds[0], sample)
            if program is None:
                program = _program_for(model, initializers, self.seeds[0])
                draws = program.draws
            else:
                draws = checked_draws(model, initializers, self.seeds[0])
            self.state = initial_state(model, build, self.seeds, draws, sample)
        if self._padding is not None:
            self.state = self._padding.pad(self.state)
        self.model = program.model
        self._epoch = program.epoch
        # This trial's dropout rates, regularisation factors, ...: inputs of the program,
        # and its width, where it runs in a wider program.
        self._knob_values = tuple(k.value for k in knobs.find_knobs(model))
        self._width = self._padding.width if self._padding is not None else 0
        self._shufflers = [fit_shuffler(s, len(x)) for s in self.seeds]
        self.x, self.y = jax.device_put(x), jax.device_put(y)
        self.xv, self.yv = jax.device_put(xv), jax.device_put(yv)
        self.n = len(x)

    def run_epoch(self, active: np.ndarray) -> dict[str, np.ndarray]:
        """Train one epoch; replicas where `active` is False keep weights and optimizer
        state unchanged. Returns each log (`loss`, metrics, `val_loss`, `val_...`) as an
        array of shape `(R,)`; entries of inactive replicas are meaningless."""
        orders = np.stack([rs.permutation(self.n) for rs in self._shufflers]).astype(np.int32)
        self.state, logs = self._epoch(self.state, np.asarray(active, bool), orders, self.x, self.y,
                                       self.xv, self.yv, self.batch_size, self._knob_values, self._width)
        return {k: np.asarray(v, dtype=np.float64) for k, v in logs.items()}

    def compile(self) -> None:
        """Compile the first epoch's train and test steps now (as that epoch would, and
        nothing more): a trial built ahead on another thread is ready when it runs."""
        # Only the shapes of a first batch matter to a compilation, not which rows it holds.
        orders = np.zeros((len(self.seeds), self.n), np.int32)
        self._epoch(self.state, np.ones(len(self.seeds), bool), orders, self.x, self.y, self.xv, self.yv,
                    self.batch_size, self._knob_values, self._width, compile_only=True)

    def weights(self, r: int) -> list[np.ndarray]:
        """Replica r's current weights in `model.get_weights()` order (at its own width)."""
        values = {}
        for kind, (variables, arrays) in enumerate(((self.model.trainable_variables, self.state[0]),
                                                    (self.model.non_trainable_variables, self.state[1]))):
            for i, (v, t) in enumerate(zip(variables, arrays)):
                value = np.asarray(t[r])
                values[id(v)] = value if self._padding is None else self._padding.unpad(kind, i, value)
        return [values[id(v)] for v in self.model.weights]


class CompileClock:
    """What JAX has compiled in this process so far: `seconds` spent tracing, lowering and
    compiling on the calling thread (a program read from the persistent cache counts its
    reading time; a program compiled ahead on another thread counts there, not here),
    `compiles`, the programs XLA really compiled (not read from the persistent cache),
    and `programs`, those compiled or read from that cache, in the whole process. Take
    two readings and subtract: `CompileClock.now()` is a snapshot."""

    _backend_compiles = 0
    _cache_hits = 0
    _listening = False
    # Per thread: `seconds`. Programs compiled side by side in `together()` count on its
    # pool threads, which nobody reads; the calling thread counts the block's wall time.
    _local = threading.local()

    def __init__(self, seconds: float, compiles: int, programs: int) -> None:
        self.seconds, self.compiles, self.programs = seconds, compiles, programs

    @classmethod
    def now(cls) -> "CompileClock":
        cls._listen()
        return cls(getattr(cls._local, "seconds", 0.0), cls._backend_compiles - cls._cache_hits, cls._backend_compiles)

    def since(self) -> "CompileClock":
        """The seconds, compilations and programs from this snapshot until now."""
        now = CompileClock.now()
        return CompileClock(now.seconds - self.seconds, now.compiles - self.compiles, now.programs - self.programs)

    @classmethod
    @contextlib.contextmanager
    def together(cls) -> Iterator[None]:
        """Programs compiled side by side in this block count its wall time, once."""
        cls._listen()
        start = time.perf_counter()
        try:
            yield
        finally:
            cls._add(time.perf_counter() - start)

    @classmethod
    def _add(cls, seconds: float) -> None:
        cls._local.seconds = getattr(cls._local, "seconds", 0.0) + seconds

    @classmethod
    def _listen(cls) -> None:
        if cls._listening:
            return
        import jax
        from jax._src import dispatch

        phases = {dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT, dispatch.BACKEND_COMPILE_EVENT}

        def on_duration(event: str, seconds: float, **kwargs: Any) -> None:
            # Called on the thread that traced or compiled.
            if event in phases:
                cls._add(seconds)
            if event == dispatch.BACKEND_COMPILE_EVENT:
                # A persistent-cache hit passes here too, and is counted off below.
                cls._backend_compiles += 1

        def on_event(event: str, **kwargs: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                cls._cache_hits += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        cls._listening = True


def fit_shuffler(seed: int, n: int) -> np.random.RandomState:
    """The generator of the training orders `model.fit(shuffle=True)` draws under the
    seed: one `permutation(n)` per epoch."""
    # `set_random_seed` seeds NumPy's global generator; `model.fit` then draws one
    # permutation while it builds the compiled loss and metrics from a first batch, and
    # one per epoch after that (Keras 3's array adapter).
    shuffler = np.random.RandomState(seed)
    shuffler.permutation(n)
    return shuffler


def _config_key(model: Any) -> str:
    """What the compiled epoch depends on, names and knobs aside: two trials whose models
    differ only in layer names (Keras numbers them per process) or in their dropout
    rates, regularisation factors, clipping and the like (`knobs`: inputs of the program,
    only their classes count) share one compiled program.

    Only Keras' own layers and model classes say all they compute in their config; a
    model with a custom layer or a Lambda gets a key of its own, never shared.
    """
    if not _keras_made(model):
        return f"unshared-{id(model)}"
    found = knobs.find_knobs(model)
    with knobs.standing_in(found):
        structure = _structure_key(model)
    if structure not in _numbers_compiled_in:
        return structure
    return json.dumps([structure, [(k.path, k.value) for k in found]])


def _structure_key(model: Any) -> str:
    """The model's config, optimizer and compile config (layer names numbered), and its
    variables' shapes."""
    optimizer = dict(model.optimizer.get_config())
    optimizer.pop("name", None)
    if isinstance(optimizer.get("learning_rate"), float):
        # A plain learning rate is an optimizer variable: traced, not compiled in.
        optimizer.pop("learning_rate")
    compiled = {k: v for k, v in (model.get_compile_config() or {}).items() if k != "optimizer"}
    names = {layer.name: f"layer{i}" for i, layer in enumerate(model._flatten_layers())}
    parts = [_canonical(model.get_config(), names), optimizer, compiled,
             [(tuple(v.shape), str(v.dtype)) for v in model.variables]]
    return json.dumps(parts, sort_keys=True, default=repr)


def _keras_made(model: Any) -> bool:
    return all(type(obj).__module__.startswith("keras.") and type(obj).__name__ != "Lambda"
               for obj in [model, *model._flatten_layers()])


# Loss reductions that divide by the batch size: a padded batch whose real rows carry
# weight batch/real and whose padding rows weight 0 gives the short batch's loss.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _pads_short_batch(model: Any) -> bool:
    """Whether the short last batch can run as a full one whose extra rows weigh nothing:
    Keras' own model and layers (their train and test steps, losses and metrics honour
    sample weights), each sample computed on its own (no BatchNormalization, no activity
    regulariser summing over the batch), and a loss that is a mean over the batch."""
    if not _keras_made(model):
        return False
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization) or getattr(layer, "activity_regularizer", None):
            return False
    losses = getattr(model._compile_loss, "_flat_losses", None) or []
    return bool(losses) and all(getattr(entry.loss, "reduction", "sum_over_batch_size") in _MEAN_REDUCTIONS
                                for entry in losses)


def _canonical(config: Any, names: dict[str, str]) -> Any:
    if isinstance(config, dict):
        return {k: _canonical(v, names) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_canonical(v, names) for v in config]
    if isinstance(config, str):
        return names.get(config, config)
    return config


def _program_for(model: Any, initializers: list | None, seed: int, masks: buckets.Masks | None = None) -> _Program:
    """The cached program of the model's structure, compiled on first use; a width
    bucket's (`masks`) is cached apart from the plain program of the same width."""
    prefix = "bucket:" if masks is not None else ""
    key = prefix + _config_key(model)
    program = _cached(key)
    if program is None:
        def compile_numbers_in() -> None:
            # The model's numbers could not be traced: its structure's programs take them
            # as constants from now on, so this one is kept under a key that names them
            # (where it is still cached).
            _numbers_compiled_in.add(key.removeprefix(prefix))
            with _programs_lock:
                if _programs.get(key) is program:
                    del _programs[key]
                    _programs[prefix + _config_key(model)] = program

        draws = checked_draws(model, initializers, seed) if initializers is not None else None
        program = _Program(model, _compile_epoch(model, compile_numbers_in, masks), draws)
        _keep(key, program)
    return program


def _cached(key: str) -> _Program | None:
    """The cached program of the key, now the most recently used, or None."""
    with _programs_lock:
        program = _programs.pop(key, None)
        if program is not None:
            _programs[key] = program
        return program


def _keep(key: str, program: _Program) -> None:
    """Cache a new program, letting the least recently used go to make room."""
    size = _variable_bytes(program.model)
    with _programs_lock:
        while _programs and (len(_programs) >= _CACHE_SIZE
                             or size + sum(_variable_bytes(p.model) for p in _programs.values()) > _CACHE_BYTES):
            _programs.pop(next(iter(_programs)))
        _programs[key] = program


def _bucket_program(model: Any, bucket: buckets.Bucket | None, seed: int,
                    sample: tuple) -> tuple[_Program | None, buckets.Padding | None]:
    """The program of the model's width bucket and how the model's state pads into it, or
    (None, None) where the model runs in its own program: no bucket, a padding that cannot
    be proven exact, or a model as wide as its bucket that shares it with no narrower width.

    A bucket's program is traced for the widths it pads (their dropout masks gathered
    over the padded units); a model as wide as its bucket runs in it at full width, and
    where it is the first of its bucket compiles it for the bucket's narrower widths."""
    if bucket is None:
        return None, None
    if bucket.units == bucket.padded:
        program, narrow = _cached("bucket:" + _config_key(model)), bucket.narrower
        if program is None and narrow is None:
            return None, None
        padding = buckets.Padding.between(model, model, bucket.units, bucket.units)
        if program is not None:
            return program, padding
        # The bucket's first trial: its program is traced as the narrower widths it will
        # serve are (their structure only).
        twin = model
        native, _ = build_native(lambda: bucket.build(narrow), seed, sample, values=False)
        if buckets.Padding.between(native, twin, narrow, bucket.padded) is None:
            return None, None
    else:
        # Structure only: the state is the native model's, padded into the twin's shapes.
        twin, _ = build_native(lambda: bucket.build(bucket.padded), seed, sample, values=False)
        native = model
        padding = buckets.Padding.between(model, twin, bucket.units, bucket.padded)
        if padding is None:
            return None, None
    masks = buckets.Masks.between(native, twin)
    if masks is None:
        return None, None
    return _program_for(twin, None, seed, masks), padding


def clear_cache() -> None:
    """Forget every compiled epoch (and the models they hold), and JAX's own caches."""
    import jax

    with _programs_lock:
        _programs.clear()
    jax.clear_caches()


def _variable_bytes(model: Any) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables)


def _compiler_options() -> dict[str, Any]:
    """XLA's options for the replicas' train and test steps: on a CPU, LLVM's optimisation
    level 1 instead of 2. A new shape compiles about 15% faster and its epochs run no
    slower (level 0 made them 2.5x slower). The numbers: the default study's LSTM and
    the MLP gave the same curves to the bit; a SimpleRNN, a Conv1D and a small LSTM
    differed in the last bit of some epochs' losses (at most 4e-7 relative over 4
    epochs), less than vmap's own batching differs from `model.fit` (about 1e-6), and the
    equivalence tests against `model.fit` hold unchanged. Set for these programs only,
    not process-wide (`XLA_FLAGS`): the user's own Keras fits in the same process compile
    as they always do. Elsewhere (a GPU), and on a JAX whose `jit` takes no compiler options
    (before 0.4.36), XLA's defaults. Returns `jax.jit`'s keyword arguments."""
    import inspect

    import jax

    if jax.default_backend() != "cpu" or "compiler_options" not in inspect.signature(jax.jit).parameters:
        return {}
    return {"compiler_options": {"xla_backend_optimization_level": 1}}


def _compile_epoch(model: Any, compile_numbers_in: Callable[[], None],
                   masks: buckets.Masks | None = None) -> Callable[..., Any]:
    """An epoch of R replicas: a Python loop over batches, each batch one jitted, vmapped
    train (or test) step of the model's own `train_step`/`test_step`, whose knobs
    (`knobs.find_knobs`) are inputs: the epoch takes the values of a trial's model.
    Where they cannot be (`knobs.Escaped`), the steps are traced again with the model's
    own numbers compiled in, and `compile_numbers_in` is told.

    Not one `lax.scan` over the batches: XLA on a CPU runs convolutions inside a loop
    body several times slower than alone (Conv1D: 3.8 ms a batch against 0.5 ms), and
    a batch's dispatch costs little beside its step.

    Where the model allows it (`_pads_short_batch`), the short last batch runs as a full
    one whose extra rows weigh nothing, so each step compiles for one batch shape, not
    two: the loss, its gradients and the metrics are those of the short batch (to
    float32 rounding), and so are the dropout masks of its real rows (JAX draws a
    random array element by element, so the first rows of a larger draw are the draw).
    """
    import jax
    import jax.numpy as jnp

    metrics_init = [jnp.zeros(v.shape, v.dtype) for v in model.metrics_variables]
    padded = _pads_short_batch(model)
    # The knobs traced as inputs (none, once they escaped), with room for each and a few
    # numbers made from them (`1.0 - rate`).
    traced = knobs.find_knobs(model)
    inputs = knobs.Inputs(slots=2 * len(traced) + 2)

    def train_replica(state: Any, active: Any, xb: Any, yb: Any, weights: Any) -> tuple[Any, Any]:
        if weights is None:
            logs, new = model.train_step(state, (xb, yb))
        else:
            logs, new = _weighted_train_step(model, state, xb, yb, *weights)
        # A replica that stopped early keeps its weights and optimizer state.
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), logs

    def test_replica(state: Any, xb: Any, yb: Any, weights: Any) -> tuple[Any, Any]:
        if weights is None:
            logs, new = model.test_step(state, (xb, yb))
        else:
            logs, new = _weighted_test_step(model, state, xb, yb, *weights)
        return new, logs

    def train_batch(state: Any, active: Any, idx: Any, x: Any, y: Any, weights: Any, leaves: Any,
                    width: Any) -> tuple[Any, Any]:
        with inputs.tracing(traced, leaves), buckets.tracing(masks, width):
            return jax.vmap(train_replica, in_axes=(0, 0, 0, 0, None))(state, active, x[idx], y[idx], weights)

    def test_batch(state: Any, idx: Any, xv: Any, yv: Any, weights: Any, leaves: Any,
                   width: Any) -> tuple[Any, Any]:
        with inputs.tracing(traced, leaves), buckets.tracing(masks, width):
            return jax.vmap(test_replica, in_axes=(0, None, None, None))(state, xv[idx], yv[idx], weights)

    def jitted() -> dict[str, Callable[..., Any]]:
        options = _compiler_options()
        return {"train": jax.jit(train_batch, **options), "test": jax.jit(test_batch, **options)}

    steps = jitted()

    def run(step: str, knob_values: tuple, width: int, *args: Any) -> tuple[Any, Any]:
        nonlocal traced
        read = len(inputs.exprs)
        try:
            out = steps[step](*args, inputs.values(knob_values), width)
        except knobs.Escaped:
            traced = []
            steps.update(jitted())
            compile_numbers_in()
            return steps[step](*args, inputs.values(knob_values), width)
        if len(inputs.exprs) != read:
            # This call traced the step and met numbers not read before, so it ran with
            # 0 in their place: run it again with their values (its state came in unchanged).
            out = steps[step](*args, inputs.values(knob_values), width)
        return out

    # Per (replicas, batch size, training and validation rows): compile-ahead tried; every
    # batch's steps compiled (ahead, where all batches are padded to one shape, or by a
    # whole epoch run). Until then an epoch of those shapes may trace, and holds `tracing`
    # while it does: a trial built ahead on another thread may share this program (the
    # same model at another batch size) and trace it at the same time.
    compiled_for: set[tuple] = set()
    ready_for: set[tuple] = set()
    tracing = threading.Lock()

    def compile_ahead(calls: list[tuple[str, tuple]]) -> bool:
        # The train and test steps of a full batch, traced here one after the other, then
        # compiled at once on two threads (XLA's compiler lets go of Python's lock; jit
        # keeps both for the calls): a new shape's test step then costs no wall time of
        # its own where there is a second core. A step whose numbers escape is left to
        # its first call (`run`).
        # True once both are compiled.
        try:
            lowered = [steps[step].trace(*args, (0.0,) * inputs.slots, 0).lower() for step, args in calls]
        except knobs.Escaped:
            return False
        if available_cores() < 2:
            return False
        with CompileClock.together(), ThreadPoolExecutor(len(lowered)) as pool:
            list(pool.map(lambda program: program.compile(), lowered))
        return True

    @jax.jit
    def fresh_metrics(active: Any) -> list[Any]:
        return [jnp.broadcast_to(m, (active.shape[0], *m.shape)) for m in metrics_init]

    def epoch(state: Any, active: np.ndarray, orders: np.ndarray, x: Any, y: Any, xv: Any, yv: Any,
              batch_size: int, knob_values: tuple, width: int,
              compile_only: bool = False) -> tuple[Any, dict[str, Any]]:
        shapes = (len(active), batch_size, x.shape[0], xv.shape[0])
        if shapes in ready_for and not compile_only:
            return batches(state, active, orders, x, y, xv, yv, batch_size, knob_values, width)
        with tracing:
            if shapes not in compiled_for:
                compiled_for.add(shapes)
                trainable, non_trainable, _, _ = state
                fresh = fresh_metrics(active)
                first = _batch(orders[:, :batch_size], batch_size, padded)
                first_val = _batch(np.arange(min(batch_size, xv.shape[0])), batch_size, padded)
                if compile_ahead([("train", ((*state[:3], fresh), active, first[0], x, y, first[1])),
                                  ("test", ((trainable, non_trainable, fresh), first_val[0], xv, yv, first_val[1]))]):
                    if padded:
                        ready_for.add(shapes)
            if compile_only:
                return state, {}
            out = batches(state, active, orders, x, y, xv, yv, batch_size, knob_values, width)
            ready_for.add(shapes)
            return out

    def batches(state: Any, active: np.ndarray, orders: np.ndarray, x: Any, y: Any, xv: Any, yv: Any,
                batch_size: int, knob_values: tuple, width: int) -> tuple[Any, dict[str, Any]]:
        trainable, non_trainable, optimizer_vars, _ = state
        fresh = fresh_metrics(active)
        state = (trainable, non_trainable, optimizer_vars, fresh)
        # Batches as model.fit and evaluate cut them: the short remainder is a batch too.
        for start in range(0, orders.shape[1], batch_size):
            idx, weights = _batch(orders[:, start:start + batch_size], batch_size, padded)
            state, train_logs = run("train", knob_values, width, state, active, idx, x, y, weights)
        trainable, non_trainable, optimizer_vars, _ = state
        test_state = (trainable, non_trainable, fresh)
        n_val = xv.shape[0]
        for start in range(0, n_val, batch_size):
            idx, weights = _batch(np.arange(start, min(start + batch_size, n_val)), batch_size, padded)
            test_state, val_logs = run("test", knob_values, width, test_state, idx, xv, yv, weights)
        # Validation moves the seed generators too (an RNN cell draws its dropout masks
        # whether or not it trains), and fit trains on from where it left them.
        non_trainable = test_state[1]
        logs = dict(train_logs)
        logs.update({f"val_{k}": v for k, v in val_logs.items()})
        return (trainable, non_trainable, optimizer_vars, fresh), logs

    return epoch


def _batch(idx: np.ndarray, batch_size: int, padded: bool) -> tuple[np.ndarray, Any]:
    """The rows of one batch (the last axis of `idx`) and, where batches are padded,
    (row weights, real rows): a short batch padded to `batch_size` with its own first
    rows, which weigh 0."""
    if not padded:
        return idx, None
    real = idx.shape[-1]
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    if real < batch_size:
        fill = np.resize(idx[..., :real], (*idx.shape[:-1], batch_size - real))
        idx = np.concatenate([idx, fill], axis=-1)
    return idx, (mask, np.float32(real))


def _weighted_loss(model: Any, state: Any, xb: Any, yb: Any, mask: Any, real: Any, training: bool,
                   optimizer_vars: Any = None) -> Any:
    trainable, non_trainable, metrics_vars = state
    # Keras divides a batch's summed loss by its size: weights batch/real on the real
    # rows make that the mean over the real rows.
    weight = mask * (mask.shape[0] / real)
    return model.compute_loss_and_updates(trainable, non_trainable, metrics_vars, xb, yb, weight, training=training,
                                          optimizer_variables=optimizer_vars)


def _weighted_metrics(model: Any, metrics_vars: Any, loss: Any, yb: Any, y_pred: Any, mask: Any,
                      real: Any) -> tuple[dict, list]:
    """Keras' metric update of a step (`_update_metrics_variables`) for a padded batch:
    the loss tracker counts the real rows, and every compiled metric, weighted or not
    (an unweighted one sees no sample weights in Keras), takes the rows' 0/1 weights."""
    from keras.src import backend

    with backend.StatelessScope(state_mapping=list(zip(model.metrics_variables, metrics_vars))) as scope:
        model._loss_tracker.update_state(loss, sample_weight=real)
        compiled = model._compile_metrics
        if compiled is not None:
            y_true, y_pred = compiled._flatten_y(yb), compiled._flatten_y(y_pred)
            for metrics in (compiled._flat_metrics, compiled._flat_weighted_metrics):
                for metric, t, p in zip(metrics, y_true, y_pred):
                    if metric:
                        metric.update_state(t, p, sample_weight=mask)
        logs = model.get_metrics_result()
    updated = [scope.get_current_value(v) for v in model.metrics_variables]
    return logs, [v.value if new is None else new for v, new in zip(model.metrics_variables, updated)]


def _weighted_train_step(model: Any, state: Any, xb: Any, yb: Any, mask: Any, real: Any) -> tuple[dict, Any]:
    """Keras' JAX `train_step` on a batch whose rows carry weights (`_batch`)."""
    import jax

    trainable, non_trainable, optimizer_vars, metrics_vars = state

    def loss_of(trainable: Any) -> Any:
        return _weighted_loss(model, (trainable, non_trainable, metrics_vars), xb, yb, mask, real, True,
                              optimizer_vars)

    (_, (loss, y_pred, non_trainable, metrics_vars)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    trainable, optimizer_vars = model.optimizer.stateless_apply(optimizer_vars, grads, trainable)
    logs, metrics_vars = _weighted_metrics(model, metrics_vars, loss, yb, y_pred, mask, real)
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def _weighted_test_step(model: Any, state: Any, xb: Any, yb: Any, mask: Any, real: Any) -> tuple[dict, Any]:
    """Keras' JAX `test_step` on a batch whose rows carry weights (`_batch`)."""
    trainable, non_trainable, metrics_vars = state
    _, (loss, y_pred, non_trainable, metrics_vars) = _weighted_loss(model, state, xb, yb, mask, real, False)
    logs, metrics_vars = _weighted_metrics(model, metrics_vars, loss, yb, y_pred, mask, real)
    return logs, (trainable, non_trainable, metrics_vars)
