"""Repeated seeded fits: a spec, resolved params and seeds in, per-seed scores and curves out.

The seeds train in lock-step, one epoch at a time, so that after each epoch the caller
sees each seed's score so far (its best epoch's) and may stop the whole trial (pruning).
One loop serves every path; a path only says how an epoch of all seeds is trained:
`vectorized` (the JAX engine, all seeds as replicas of one program), `sequential` (one
Keras model per seed) or `analytic` (a pseudo learning curve, no Keras). A trial built
ahead on another thread (`prepare`) and the memory given back after it (`release_memory`)
are here too: both hold the one lock that guards Keras' state while models are built.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from hpo.backend import check_devices, configure_determinism, rss_mb, use_backend
from hpo.errors import TrialDiverged, TrialFailed
from hpo.specs import StudySpec

# Called after every epoch with (the epoch, counted from 1 as Keras prints it; each seed's
# score if the trial stopped now: `EarlyStopper.best`); returning True stops the trial
# (it is pruned).
EpochCallback = Callable[[int, list[float]], bool]

CURVE_KEYS = ("loss", "val_loss", "metric", "val_metric")


@dataclass
class SeedFit:
    """One seed's fit. `best_epoch` counts from 1, as Keras prints epochs."""

    seed: int
    score: float
    best_epoch: int
    epochs_run: int
    curves: dict[str, list[float]]


@dataclass
class RepeatFit:
    """All seeds of one trial; `path` says which training path ran."""

    fits: list[SeedFit]
    fit_seconds: float
    path: str
    pruned_at_epoch: int | None = None
    backend: str | None = None
    # Wall time of each lock-step epoch; fit_seconds less these is the trial's fixed
    # cost (loading data, building, tracing and compiling).
    epoch_seconds: list[float] = field(default_factory=list)
    # With `keep_best`: each seed's weights at its best epoch, in `model.get_weights()` order.
    best_weights: list[list[np.ndarray]] | None = None
    # Seconds JAX spent tracing and compiling during the fit (None off JAX): part of
    # fit_seconds, what a trial pays for a program no process had compiled before.
    compile_seconds: float | None = None
    # Seconds another thread spent building and compiling this fit while the trial before
    # it trained (`prepare`): not part of fit_seconds. None: built by the fit itself.
    prepared_seconds: float | None = None

    @property
    def fixed_seconds(self) -> float:
        """The trial's cost beyond its epochs, each epoch counted at the median epoch's
        time (the first epoch also pays compilation)."""
        if not self.epoch_seconds:
            return self.fit_seconds
        return max(0.0, self.fit_seconds - len(self.epoch_seconds) * statistics.median(self.epoch_seconds))

    @property
    def scores(self) -> list[float]:
        return [f.score for f in self.fits]

    @property
    def mean(self) -> float:
        return float(statistics.fmean(self.scores))

    @property
    def std(self) -> float:
        """Sample standard deviation of the per-seed scores (0 for one seed)."""
        return float(statistics.stdev(self.scores)) if len(self.fits) > 1 else 0.0


@dataclass
class EarlyStopper:
    """Keras' EarlyStopping rule for one seed, with the best-epoch score kept
    (what `restore_best_weights=True` would evaluate to).

    With `score = "last"` the seed trains every epoch and scores its final one (a fixed
    training length, as published experiments often report), so nothing stops it early.
    """

    direction: str
    patience: int
    min_delta: float
    best: float = math.nan
    best_epoch: int = 0
    epochs_run: int = 0
    wait: int = 0
    stopped: bool = False
    last: float = math.nan
    score: str = "best"

    def update(self, value: float) -> None:
        self.epochs_run += 1
        self.last = value
        if self.score == "last":
            self.best, self.best_epoch = value, self.epochs_run
            return
        if math.isnan(self.best) or self._improves(value):
            self.best, self.best_epoch, self.wait = value, self.epochs_run, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped = True

    def _improves(self, value: float) -> bool:
        if self.direction == "minimize":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EpochTrainer(Protocol):
    """One training path: trains every seed one epoch and returns each log (`loss`,
    `val_loss`, the metrics and their `val_` forms) as one value per seed. Seeds whose
    `active` entry is False have stopped early: their weights must not change.
    `weights(i)` gives seed i's current weights (`keep_best` asks for them)."""

    def run_epoch(self, active: np.ndarray) -> dict[str, np.ndarray]: ...


def fit_repeats(spec: StudySpec, params: dict[str, Any], seeds: list[int],
                on_epoch: EpochCallback | None = None, *, path: str | None = None,
                backend: str | None = None, keep_best: bool = False) -> RepeatFit:
    """Fit the params once per seed, in lock-step, with per-seed early stopping.

    On the JAX backend the seeds train as replicas of one vectorised program
    (`engine.py`, path "vectorized"); a stateful LSTM, a split resampled per seed, or the
    TensorFlow backend train one Keras model per seed (path "sequential"). Both give
    seed r the fit `model.fit(shuffle=True)` gives after `set_random_seed(r)`.

    Args:
        spec: The study.
        params: Resolved params (`space.suggest_params`).
        seeds: One fit per seed; the same seed gives the same fit.
        on_epoch: See `EpochCallback`. Its time is not counted in `fit_seconds`.
        path: "vectorized" or "sequential" to force a path; None picks one.
        backend: "jax" or "tensorflow" to force a Keras backend (a replay uses the
            trial's); None: the spec's, `HPO_BACKEND`, or the default.
        keep_best: Keep each seed's weights at its best epoch (`RepeatFit.best_weights`),
            as `EarlyStopping(restore_best_weights=True)` restores them; `hpo export`
            refits with it, trials do not pay for it.

    Raises:
        TrialDiverged: A seed's loss became NaN or infinite.
        BackendError: Keras is already loaded in this process with another backend.
    """
    if spec.model.family == "analytic":
        trainer: EpochTrainer = _AnalyticTrainer(spec, params, seeds)
        return _lock_step(spec, seeds, trainer, on_epoch, "analytic", None, keep_best=keep_best)
    backend = use_backend(backend or spec.training.backend)
    # Before the clock starts: the first trial of a process would pay the import.
    configure_determinism(backend)
    unsupported = _unsupported_reason(spec, backend)
    if path == "vectorized" and unsupported:
        raise ValueError(f"cannot train these seeds as vectorized replicas: {unsupported}")
    chosen = "sequential" if path == "sequential" or unsupported else "vectorized"
    clock = _compile_clock(backend)
    start = time.perf_counter()
    prepared = _take_prepared(params, seeds) if chosen == "vectorized" else None
    if prepared is not None:
        trainer, ahead_seconds = prepared
    else:
        with _keras_lock:
            _release_if_due()
            trainer = (_vectorized_trainer if chosen == "vectorized" else _SequentialTrainer)(spec, params, seeds)
    fit = _lock_step(spec, seeds, trainer, on_epoch, chosen, backend, setup=time.perf_counter() - start,
                     keep_best=keep_best)
    if clock is not None:
        fit.compile_seconds = clock.since().seconds
    if prepared is not None:
        fit.prepared_seconds = ahead_seconds
    return fit


# The trainers `prepare` built for trials that run next, by what each was built for: the
# trainer, and the seconds its thread spent building it and compiling.
_prepared: dict[str, tuple[EpochTrainer, float]] = {}
# Held while models are built and while Keras' state is cleared: Keras keeps its state
# per thread, but `clear_session` replaces every thread's at once (a build on another
# thread lost its stateless scope mid-trace and stored a tracer in a variable), and our
# watchers of a build (`initial.build_native`, `flat_random`) patch Keras process-wide.
_keras_lock = threading.RLock()
# Keras' own per-thread settings a user may set once (`keras.config.set_dtype_policy`,
# a distribution, ...), carried to the thread that builds ahead.
_KERAS_SETTINGS = ("dtype_policy", "distribution", "nnx_enabled", "flash_attention", "traceback_filtering")


def keras_settings() -> dict[str, Any]:
    """This thread's Keras settings (`_KERAS_SETTINGS`) that are set, for `prepare`."""
    from keras.src.backend.common import global_state

    return {name: value for name in _KERAS_SETTINGS
            if (value := global_state.get_global_attribute(name)) is not None}


def can_prepare(spec: StudySpec) -> bool:
    """Whether `prepare` builds anything for the spec: a Keras study on the JAX engine,
    without adaptive seeds (whose later seed batches compile while the trial runs, beside
    a build ahead that may share their program)."""
    from hpo.backend import resolve_backend

    return (spec.model.family != "analytic" and spec.seeds_max is None
            and not _unsupported_reason(spec, resolve_backend(spec.training.backend)))


def prepare(spec: StudySpec, params: dict[str, Any], seeds: list[int], settings: dict[str, Any]) -> None:
    """Build the vectorised trainer of a trial that runs next (of a spec that
    `can_prepare`) and compile its first epoch, so that `fit_repeats` of these params and
    seeds starts training at once. Run on another thread while a trial trains (the
    worker's ask-ahead), with the Keras `settings` of the thread that runs trials
    (`keras_settings`). Raises nothing: a fault here is met again, and reported, when the
    trial runs."""
    from keras.src.backend.common import global_state

    try:
        for name, value in settings.items():
            global_state.set_global_attribute(name, value)
        start = time.perf_counter()
        with _keras_lock:
            # Here, not after the trial that runs meanwhile: the staging a clear drops
            # holds a compiled program until its first call, which this one's is not yet.
            _clear_jax_caches_once_grown()
            trainer = _vectorized_trainer(spec, params, seeds)
            trainer.compile()
            _prepared[_prepared_key(params, seeds)] = (trainer, time.perf_counter() - start)
    except Exception:  # noqa: BLE001 - the trial meets it again when it runs
        return


def discard_prepared() -> None:
    """Forget every trainer built ahead (their trials will not run in this process)."""
    _prepared.clear()


def _take_prepared(params: dict[str, Any], seeds: list[int]) -> tuple[EpochTrainer, float] | None:
    """The trainer `prepare` built for these params and seeds, with the seconds it took."""
    with _keras_lock:  # nothing is being built ahead meanwhile
        # Before the trainer is taken: a program built ahead and not yet run lives in
        # JAX's staging, which the release must not clear.
        _release_if_due()
        return _prepared.pop(_prepared_key(params, seeds), None)


def _prepared_key(params: dict[str, Any], seeds: list[int]) -> str:
    return json.dumps([params, seeds], sort_keys=True, default=repr)


def _compile_clock(backend: str) -> Any:
    if backend != "jax":
        return None
    from hpo.train.engine import CompileClock

    return CompileClock.now()


def check_spec_runs(spec: StudySpec) -> None:
    """Load the spec's data and build its model once, with the first point of its space,
    so a bad CSV, a failing loader or build hook, or a model that does not fit the data
    stops before any trial (and before anything is written to the study database).

    Raises:
        SpecError: Naming the study file, the field and the fix.
        BackendError: Keras is loaded with another backend than the spec asks for.
    """
    from hpo.train.data import check_data

    if spec.model.family != "analytic":
        # Before any data code imports Keras (a csv_text dataset tokenises with it).
        backend = use_backend(spec.training.backend)
        configure_determinism(backend)
        check_devices(backend)
    check_data(spec)
    if spec.model.family == "analytic":
        return
    from hpo.train.models import check_first_params, check_model

    params = check_first_params(spec)
    data = _load_data(spec, params, spec.seed)
    check_model(spec, params, data.input_shape, data.n_outputs, len(data.x_train))


def _unsupported_reason(spec: StudySpec, backend: str) -> str | None:
    if backend != "jax":
        return f"the {backend} backend trains one model per seed; vectorised replicas need JAX"
    if spec.model.stateful:
        return "a stateful LSTM carries its state across batches of one fixed data order"
    if spec.data.resample_split:
        return "each seed resamples its own train/validation split"
    return None


def _lock_step(spec: StudySpec, seeds: list[int], trainer: EpochTrainer, on_epoch: EpochCallback | None,
               path: str, backend: str | None, setup: float = 0.0, keep_best: bool = False) -> RepeatFit:
    """The one loop of every path: an epoch of all active seeds, their curves and early
    stopping, then each seed's score so far to the pruner."""
    stoppers = [_stopper(spec) for _ in seeds]
    curves: list[dict[str, list[float]]] = [{k: [] for k in CURVE_KEYS} for _ in seeds]
    sources = {"loss": "loss", "val_loss": "val_loss", "metric": spec.metric.removeprefix("val_"),
               "val_metric": spec.metric}
    pruned_at, epoch_seconds = None, []
    best_weights: list = [None] * len(seeds)
    for epoch in range(spec.training.max_epochs):
        active = np.array([not s.stopped for s in stoppers])
        start = time.perf_counter()
        logs = trainer.run_epoch(active)
        epoch_seconds.append(time.perf_counter() - start)
        for i in np.flatnonzero(active):
            for key in ("loss", "val_loss"):
                value = float(logs[key][i])
                if not math.isfinite(value):
                    raise TrialDiverged(f"seed {seeds[i]}: {key} became {value} at epoch {epoch + 1}; "
                                        "the learning rate is likely too high for this configuration")
            for key, source in sources.items():
                curves[i][key].append(float(logs[source][i]))
            stoppers[i].update(float(logs[spec.metric][i]))
            if keep_best and stoppers[i].best_epoch == stoppers[i].epochs_run:
                best_weights[i] = trainer.weights(i)
        # The pruner's time (a database round trip, possibly a database outage) is not fit time.
        if on_epoch is not None and on_epoch(epoch + 1, [float(s.best) for s in stoppers]):
            pruned_at = epoch + 1
            break
        if all(s.stopped for s in stoppers):
            break
    fits = [SeedFit(seed, float(s.best), s.best_epoch, s.epochs_run, c) for seed, s, c in zip(seeds, stoppers, curves)]
    return RepeatFit(fits, setup + sum(epoch_seconds), path, pruned_at, backend, epoch_seconds,
                     best_weights if keep_best else None)


def _stopper(spec: StudySpec) -> EarlyStopper:
    return EarlyStopper(spec.direction, spec.training.patience, spec.training.min_delta,
                        score=spec.training.score)


class _AnalyticTrainer:
    def __init__(self, spec: StudySpec, params: dict[str, Any], seeds: list[int]) -> None:
        from hpo.train import analytic

        self.spec = spec
        self.values = np.array([analytic.curve(spec.model.function, params, seed=s, epochs=spec.training.max_epochs,
                                               noise=spec.model.noise) for s in seeds])
        self.epoch = 0

    def run_epoch(self, active: np.ndarray) -> dict[str, np.ndarray]:
        if self.spec.model.epoch_seconds:
            time.sleep(self.spec.model.epoch_seconds)
        v = self.values[:, self.epoch]
        self.epoch += 1
        return {"loss": v, "val_loss": v, "value": v, "val_value": v}


def _load_data(spec: StudySpec, params: dict[str, Any], split_seed: int) -> Any:
    from hpo.train.data import load_trial_data

    return load_trial_data(spec, params, split_seed)


def _compiled_builder(spec: StudySpec, params: dict[str, Any], data: Any, n_train: int) -> Callable[[], Any]:
    """A function that builds and compiles the trial's Keras model (uncalled: each seed
    builds it under its own `set_random_seed`); the built-in family's or the user's (a
    KerasTuner-style `build(hp)` compiles its own)."""
    from hpo.train.models import compile_model, compiles_itself, model_factory

    steps = max(1, math.ceil(n_train / params["batch_size"]))
    factory = model_factory(spec)
    compiled = compiles_itself(spec)

    def build() -> Any:
        model = factory(params, data.input_shape, data.n_outputs)
        if not compiled:
            compile_model(model, params, output=spec.output, steps_per_epoch=steps, loss=spec.training.loss)
        return model

    return build


def build_trial_model(spec: StudySpec, params: dict[str, Any], data: Any) -> Any:
    """A new compiled Keras model of the trial for `data` (the built-in family's or the
    user's), as each seed's fit builds it: `hpo export` puts a seed's weights in it."""
    return _compiled_builder(spec, params, data, len(data.x_train))()


def _vectorized_trainer(spec: StudySpec, params: dict[str, Any], seeds: list[int]) -> EpochTrainer:
    from hpo.train.engine import Replicas

    data = _load_data(spec, params, spec.seed)
    build = _compiled_builder(spec, params, data, len(data.x_train))
    return Replicas(build, seeds, data.x_train, data.y_train, data.x_val, data.y_val, params["batch_size"],
                    bucket=_width_bucket(spec, params, data))


def _width_bucket(spec: StudySpec, params: dict[str, Any], data: Any) -> Any:
    """The width bucket a built-in family's trial runs in (`hpo.train.buckets`): where `units` is
    searched, its activation keeps a zero unit at zero, and `HPO_WIDTH_BUCKETS` is not 0."""
    from hpo.train.buckets import Bucket, bucket, keeps_zero
    from hpo.train.models import RECURRENT_LAYERS
    from hpo.specs import Choice, IntRange

    searched = spec.space.get("units")
    if (spec.model.family not in (*RECURRENT_LAYERS, "mlp") or os.environ.get("HPO_WIDTH_BUCKETS", "1") == "0"
            or not isinstance(searched, (IntRange, Choice)) or not keeps_zero(params["activation"])):
        return None
    widths = (tuple(range(searched.low, searched.high + 1, searched.step)) if isinstance(searched, IntRange)
              else tuple(sorted(int(c) for c in searched.choices)))
    high = max(widths)
    units = int(params["units"])

    def build(width: int) -> Any:
        return _compiled_builder(spec, dict(params, units=width), data, len(data.x_train))()

    return Bucket(units, bucket(units, int(high)), build, widths)


class _SequentialTrainer:
    """One Keras model per seed, one `fit` call per seed per epoch on the data order
    `model.fit(shuffle=True)` would draw for that seed."""

    def __init__(self, spec: StudySpec, params: dict[str, Any], seeds: list[int]) -> None:
        import keras

        from hpo.train.engine import fit_shuffler

        self.spec = spec
        self.batch_size = params["batch_size"]
        self.runs = []
        for seed in seeds:
            data = _load_data(spec, params, seed if spec.data.resample_split else spec.seed)
            x, y, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
            if spec.model.stateful:
                # A stateful LSTM runs fixed-size batches; drop the ragged tail.
                b = self.batch_size
                x, y = x[: len(x) // b * b], y[: len(y) // b * b]
                xv, yv = xv[: len(xv) // b * b], yv[: len(yv) // b * b]
                if len(x) == 0 or len(xv) == 0:
                    raise TrialFailed(f"batch_size {b} is larger than the data of a stateful LSTM; lower batch_size")
            keras.utils.set_random_seed(seed)
            model = _compiled_builder(spec, params, data, len(x))()
            self.runs.append((model, x, y, (xv, yv), fit_shuffler(seed, len(x))))

    def run_epoch(self, active: np.ndarray) -> dict[str, np.ndarray]:
        per_seed: list[dict[str, float]] = []
        for (model, x, y, validation, shuffler), on in zip(self.runs, active):
            if not on:
                per_seed.append({})
                continue
            if not self.spec.model.stateful:
                order = shuffler.permutation(len(x))
                x, y = x[order], y[order]
            history = model.fit(x, y, batch_size=self.batch_size, epochs=1, verbose=0, shuffle=False,
                                validation_data=validation).history
            if self.spec.model.stateful:
                for layer in model.layers:
                    if getattr(layer, "stateful", False):
                        layer.reset_state()
            per_seed.append({k: float(v[-1]) for k, v in history.items()})
        # One column per log, one entry per seed (NaN for a seed that has stopped), whichever
        # seed is the first still training.
        keys = {k for logs in per_seed for k in logs}
        return {k: np.array([logs.get(k, math.nan) for logs in per_seed]) for k in keys}

    def weights(self, i: int) -> list[np.ndarray]:
        return self.runs[i][0].get_weights()


def release_memory() -> None:
    """Free what Keras and TensorFlow hold between trials, so a long study stays flat.

    While the next trial is being built ahead (`prepare` holds `_keras_lock`), this does
    not wait for that build: the release is left to the next fit, which takes the lock
    anyway (`_release_if_due`). A trial that ends before the build of the one after it
    then ends at once, and the wait for that build is the next trial's own."""
    import sys

    global _release_due
    # Without Keras (the analytic family) there is nothing to free, and a full collection
    # of a large heap would cost more than the trial.
    if "keras" not in sys.modules:
        return
    if not _keras_lock.acquire(blocking=False):
        _release_due = True
        return
    try:
        _release()
    finally:
        _keras_lock.release()


def _release_if_due() -> None:
    """A release `release_memory` left for later, done now; with `_keras_lock` held."""
    if _release_due:
        _release()


def _release() -> None:
    import gc

    import keras

    global _release_due
    _release_due = False
    # One collection, not two (clear_session collects too unless told not to).
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    if keras.backend.backend() == "jax" and not _prepared:
        _clear_jax_caches_once_grown()
    _return_free_memory()


_release_due = False


# JAX keeps, process-wide, what it staged for every shape it has met (traces, lowerings,
# abstract evaluations, the eager ops of each new model and width) in caches bounded by
# entries, not bytes: a worker grew 200 MB through them from trial 10 to 200 of the
# default study. Between trials, once the process has grown this much past the least it
# held after a trial, those staging caches are cleared; the executables of programs that
# have run stay (JAX's public `jax.clear_caches` drops them too, and retracing the cached
# programs after it made a 120-trial study 13% slower). A program compiled but not yet
# called lives in that staging only, so with ask-ahead the clear comes before the next
# trial is built, never between its build and its run. What a clear cannot give back (the
# trial after it still that far above) becomes the new floor, so a process never clears
# every trial.
JAX_CACHE_GROWTH_MB = 64
_floor_mb: float | None = None
_just_cleared = False


def _clear_jax_caches_once_grown() -> None:
    global _floor_mb, _just_cleared
    now = rss_mb()
    grown = _floor_mb is not None and now - _floor_mb > JAX_CACHE_GROWTH_MB
    if _floor_mb is None or now < _floor_mb or (grown and _just_cleared):
        _floor_mb, _just_cleared = now, False
    elif grown:
        _clear_jax_staging()
        _just_cleared = True
    else:
        _just_cleared = False


def _clear_jax_staging() -> None:
    """JAX's Python-side caches (`jax._src.util`'s, which `jax.clear_caches` clears
    first); nothing where a JAX release has moved them."""
    try:
        from jax._src import util
    except ImportError:
        return
    clear = getattr(util, "clear_all_caches", None)
    if callable(clear):
        clear()


def _return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; nothing
    elsewhere). What a trial's models and XLA's compilations freed stays in the process's
    resident size otherwise, spread over the arenas of the threads that compiled: with
    it a 100-trial worker held 957 MB against 1436 MB without. The trim (70-110 ms after
    a trial) runs on a thread of its own, beside the next trial (ctypes lets go of
    Python's lock for it)."""
    global _trimmer
    if _trimmer is None:
        import ctypes

        try:
            _trimmer = _Trimmer(ctypes.CDLL(None).malloc_trim)
        except (AttributeError, OSError):
            _trimmer = False
    if _trimmer:
        _trimmer.ask()


class _Trimmer:
    """`malloc_trim` on a thread of its own, run whenever asked; `settle` waits for the
    trims asked so far."""

    def __init__(self, trim: Callable[[int], Any]) -> None:
        self.trim = trim
        self.asked = self.done = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._run, name="hpo-malloc-trim", daemon=True).start()

    def ask(self) -> None:
        with self.changed:
            self.asked += 1
            self.changed.notify_all()

    def settle(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.done >= self.asked, timeout)

    def _run(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.done < self.asked)
                asked = self.asked
            self.trim(0)
            with self.changed:
                self.done = asked
                self.changed.notify_all()


_trimmer: _Trimmer | bool | None = None


def settled_rss_mb(timeout: float = 5.0) -> float:
    """The resident size once the trims asked for so far have handed their pages back
    (waiting at most `timeout` s): read right after a trial, the size would still hold
    what its trim is about to give back, by as much as the trial grew the process."""
    if _trimmer:
        _trimmer.settle(timeout)
    return rss_mb()
