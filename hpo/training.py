"""Repeated seeded fits: a spec, resolved params and seeds in, per-seed scores and curves out.

The seeds train in lock-step, one epoch at a time, so that after each epoch the caller
sees the mean of their current validation metric and may stop the whole trial (pruning).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hpo.errors import TrialDiverged, TrialFailed
from hpo.spec import RECURRENT_FAMILIES, StudySpec

# Called after every epoch with (epoch index from 0, mean of the seeds' current
# validation metric); returning True stops the trial (it is pruned).
EpochCallback = Callable[[int, float], bool]

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

    @property
    def current(self) -> float:
        """What this seed contributes to the pruner: its latest value while it trains,
        its best once it has stopped (its weights would be restored to that epoch)."""
        return self.best if self.stopped else self.last


def check_finite(seed: int, epoch: int, logs: dict[str, float]) -> None:
    """Raise `TrialDiverged` when a fit's loss turned NaN or infinite."""
    for key in ("loss", "val_loss"):
        value = logs.get(key)
        if value is not None and not math.isfinite(value):
            raise TrialDiverged(f"seed {seed}: {key} became {value} at epoch {epoch + 1}; "
                                "the learning rate is likely too high for this configuration")


def fit_repeats(spec: StudySpec, params: dict[str, Any], seeds: list[int],
                on_epoch: EpochCallback | None = None, *, path: str | None = None) -> RepeatFit:
    """Fit the params once per seed, in lock-step, with per-seed early stopping.

    The built-in families train their seeds as replicas of one model (`replicas.py`,
    path "vectorized") unless something about the spec needs separate models; then
    each seed is its own Keras model (path "sequential").

    Args:
        spec: The study.
        params: Resolved params (`space.suggest_params`).
        seeds: One fit per seed; the same seed gives the same fit.
        on_epoch: See `EpochCallback`.
        path: "vectorized" or "sequential" to force a path; None picks one.

    Raises:
        TrialDiverged: A seed's loss became NaN or infinite.
    """
    if spec.model.family != "analytic":
        # Before the clock starts: the first trial of a process would pay TensorFlow's import.
        configure_determinism()
    start = time.perf_counter()
    if spec.model.family == "analytic":
        fits, pruned_at = _fit_analytic(spec, params, seeds, on_epoch)
        return RepeatFit(fits, time.perf_counter() - start, "analytic", pruned_at)
    if path != "sequential":
        from hpo import replicas

        reason = replicas.unsupported_reason(spec)
        if reason is None:
            return replicas.fit_replicated(spec, params, seeds, on_epoch)
        if path == "vectorized":
            raise ValueError(f"cannot train these seeds as replicas: {reason}")
    fits, pruned_at = _fit_sequential(spec, params, seeds, on_epoch)
    return RepeatFit(fits, time.perf_counter() - start, "sequential", pruned_at)


def _stopper(spec: StudySpec) -> EarlyStopper:
    return EarlyStopper(spec.direction, spec.training.patience, spec.training.min_delta,
                        score=spec.training.score)


def _lock_step(stoppers: list[EarlyStopper], epoch: int, on_epoch: EpochCallback | None) -> bool:
    """After an epoch: True when the trial should stop (pruned)."""
    if on_epoch is None:
        return False
    return bool(on_epoch(epoch, float(statistics.fmean(s.current for s in stoppers))))


def _finish(seeds: list[int], stoppers: list[EarlyStopper], curves: list[dict[str, list[float]]]) -> list[SeedFit]:
    return [SeedFit(seed, float(s.best), s.best_epoch, s.epochs_run, c) for seed, s, c in zip(seeds, stoppers, curves)]


def _fit_analytic(spec: StudySpec, params: dict[str, Any], seeds: list[int],
                  on_epoch: EpochCallback | None) -> tuple[list[SeedFit], int | None]:
    from hpo import analytic

    values = [analytic.curve(spec.model.function, params, seed=s, epochs=spec.training.max_epochs,
                             noise=spec.model.noise) for s in seeds]
    stoppers = [_stopper(spec) for _ in seeds]
    curves: list[dict[str, list[float]]] = [{k: [] for k in CURVE_KEYS} for _ in seeds]
    for epoch in range(spec.training.max_epochs):
        if spec.model.epoch_seconds:
            time.sleep(spec.model.epoch_seconds)
        for i, stopper in enumerate(stoppers):
            if stopper.stopped:
                continue
            v = values[i][epoch]
            check_finite(seeds[i], epoch, {"loss": v})
            for key in CURVE_KEYS:
                curves[i][key].append(v)
            stopper.update(v)
        if _lock_step(stoppers, epoch, on_epoch):
            return _finish(seeds, stoppers, curves), epoch + 1
        if all(s.stopped for s in stoppers):
            break
    return _finish(seeds, stoppers, curves), None


@dataclass
class _SeedRun:
    seed: int
    model: Any
    x: np.ndarray
    y: np.ndarray
    validation: tuple[np.ndarray, np.ndarray]
    rng: np.random.Generator
    stopper: EarlyStopper
    curves: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in CURVE_KEYS})


def _fit_sequential(spec: StudySpec, params: dict[str, Any], seeds: list[int],
                    on_epoch: EpochCallback | None) -> tuple[list[SeedFit], int | None]:
    configure_determinism()
    metric_key = spec.metric.removeprefix("val_")
    runs = [_build_run(spec, params, seed) for seed in seeds]
    batch_size = params["batch_size"]
    for epoch in range(spec.training.max_epochs):
        for run in runs:
            if run.stopper.stopped:
                continue
            x, y = run.x, run.y
            if not spec.model.stateful:
                # Each seed shuffles with its own generator, so its data order does not
                # depend on how many other seeds train beside it.
                order = run.rng.permutation(len(x))
                x, y = x[order], y[order]
            history = run.model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False,
                                    validation_data=run.validation)
            logs = {k: float(v[-1]) for k, v in history.history.items()}
            if spec.model.stateful:
                _reset_states(run.model)
            check_finite(run.seed, epoch, logs)
            for key, source in (("loss", "loss"), ("val_loss", "val_loss"),
                                ("metric", metric_key), ("val_metric", spec.metric)):
                run.curves[key].append(logs[source])
            run.stopper.update(logs[spec.metric])
        stoppers = [r.stopper for r in runs]
        if _lock_step(stoppers, epoch, on_epoch):
            return _finish(seeds, stoppers, [r.curves for r in runs]), epoch + 1
        if all(s.stopped for s in stoppers):
            break
    return _finish(seeds, [r.stopper for r in runs], [r.curves for r in runs]), None


def _build_run(spec: StudySpec, params: dict[str, Any], seed: int) -> _SeedRun:
    import keras

    from hpo.data import load_dataset
    from hpo.models import build_model, compile_model

    split_seed = seed if spec.data.resample_split else spec.seed
    data = load_dataset(spec.data, window=params.get("window"), sequence=spec.model.family in RECURRENT_FAMILIES,
                        split_seed=split_seed)
    x, y, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    if spec.model.stateful:
        # A stateful LSTM runs fixed-size batches; drop the ragged tail.
        b = params["batch_size"]
        x, y = x[: len(x) // b * b], y[: len(y) // b * b]
        xv, yv = xv[: len(xv) // b * b], yv[: len(yv) // b * b]
        if len(x) == 0 or len(xv) == 0:
            raise TrialFailed(f"batch_size {b} is larger than the data of a stateful LSTM; lower batch_size")
    keras.utils.set_random_seed(seed)
    model = build_model(params, data.input_shape, family=spec.model.family, output=spec.output,
                        n_outputs=data.n_outputs, stateful=spec.model.stateful)
    steps = max(1, math.ceil(len(x) / params["batch_size"]))
    compile_model(model, params, output=spec.output, steps_per_epoch=steps)
    return _SeedRun(seed, model, x, y, (xv, yv), np.random.default_rng(seed), _stopper(spec))


def _reset_states(model: Any) -> None:
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()


_determinism_configured = False


def configure_determinism() -> None:
    """Import TensorFlow quietly and make its ops deterministic (once per process), so a
    replay is exact."""
    global _determinism_configured
    if _determinism_configured:
        return
    _import_tensorflow_quietly()
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    _determinism_configured = True


def _import_tensorflow_quietly() -> None:
    # TensorFlow's native start-up lines (oneDNN, CUDA stubs) go to fd 2 before its own
    # log settings apply; hide just that import. A failing import still raises here.
    import os
    import sys

    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def release_memory() -> None:
    """Free what Keras and TensorFlow hold between trials, so a long study stays flat."""
    import gc
    import sys

    # Without Keras (the analytic family) there is nothing to free, and a full collection
    # of a large heap would cost more than the trial.
    if "keras" not in sys.modules:
        return
    import keras

    keras.backend.clear_session()
    gc.collect()
