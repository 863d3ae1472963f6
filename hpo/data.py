"""Datasets: a `DataSpec` (plus the trial's window) in, scaled train/validation arrays out.

Built-in data is generated or ships with scikit-learn, so nothing is downloaded; scaling
is fitted on the training split only, and the split is fixed unless the spec resamples it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from hpo.errors import SpecError
from hpo.spec import RECURRENT_FAMILIES, Choice, DataSpec, Fixed, IntRange, StudySpec

# The built-in series are the same in every study, whatever the study seed.
_DATA_SEED = 20240611


@dataclass(frozen=True)
class Dataset:
    """Arrays ready for `model.fit`: float32 inputs; float32 `(n, 1)` regression targets
    or int32 class labels `(n,)`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    task: str
    n_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


class _Scaler:
    def __init__(self, kind: str, train: np.ndarray) -> None:
        self.kind = kind
        if kind == "standardize":
            self.shift, self.scale = train.mean(axis=0), train.std(axis=0)
        elif kind == "normalize":
            self.shift, self.scale = train.min(axis=0), train.max(axis=0) - train.min(axis=0)
        else:
            self.shift, self.scale = 0.0, 1.0
        self.scale = np.where(np.asarray(self.scale) == 0, 1.0, self.scale)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (values - self.shift) / self.scale


def load_dataset(spec: DataSpec, *, window: int | None = None, sequence: bool = True,
                 split_seed: int = 0) -> Dataset:
    """Build the train/validation arrays for one fit.

    Args:
        spec: The study's `[data]` table.
        window: Input length for series data; the spec's `window` when None.
        sequence: True for recurrent families, whose inputs are `(n, steps, features)`.
        split_seed: Seed of a random split (the study seed, or the fit's seed when the
            spec resamples the split per seed).
    """
    return _load_cached(spec, window or spec.window, sequence, split_seed)


@functools.lru_cache(maxsize=16)
def _load_cached(spec: DataSpec, window: int, sequence: bool, split_seed: int) -> Dataset:
    if spec.name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.data.astype(np.float32)
        return _table(spec, x, digits.target.astype(np.int32), "classification", split_seed, sequence,
                      steps=(8, 8))
    if spec.name == "csv_table":
        return _csv_table(spec, split_seed, sequence)
    if spec.name == "noisy_sine":
        rng = np.random.default_rng(_DATA_SEED)
        t = np.arange(spec.n_samples, dtype=np.float64)
        clean = np.sin(2 * np.pi * t / 50.0)
        noisy = clean + spec.noise * rng.standard_normal(spec.n_samples)
        return _series(spec, noisy, clean, window, split_seed)
    if spec.name == "sequence_echo":
        values = np.arange(spec.n_samples + 1, dtype=np.float64) / spec.n_samples
        return _series(spec, values, values, window, split_seed)
    if spec.name == "csv_series":
        import pandas as pd

        frame = pd.read_csv(spec.path)
        series = pd.to_numeric(frame[spec.column], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(series).any():
            raise SpecError(spec.path, "data.column", f'column "{spec.column}" has empty or non-numeric values; '
                                                      "clean the file or choose another column")
        return _series(spec, series, series, window, split_seed)
    raise SpecError("<data>", "data.name", f"unknown dataset {spec.name!r}")


def _series(spec: DataSpec, inputs: np.ndarray, targets: np.ndarray, window: int, split_seed: int) -> Dataset:
    n = len(inputs) - window - spec.horizon + 1
    if len(inputs) - spec.horizon < 4:
        # Too far ahead even for a window of one point: the horizon is at fault.
        raise SpecError("<data>", "data.horizon", f"horizon {spec.horizon} leaves fewer than 4 samples from "
                                                  f"{len(inputs)} points; shorten the horizon")
    if n < 4:
        raise SpecError("<data>", "data.window", f"window {window} + horizon {spec.horizon} leave {max(n, 0)} samples "
                                                 f"from {len(inputs)} points; shorten the window")
    n_val = max(1, int(round(n * spec.val_fraction)))
    if spec.effective_split == "chronological":
        train_idx, val_idx = np.arange(n - n_val), np.arange(n - n_val, n)
        # Fit the scaler on the points the training windows and targets see, nothing later.
        seen = inputs[: (n - n_val) + window + spec.horizon - 1]
    else:
        order = np.random.default_rng(split_seed).permutation(n)
        train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
        seen = np.concatenate([inputs[i: i + window] for i in train_idx])
    scaler = _Scaler(spec.scaling, seen)
    scaled_in, scaled_out = scaler(inputs), scaler(targets)
    x = np.lib.stride_tricks.sliding_window_view(scaled_in, window)[:n].astype(np.float32)[..., None]
    y = scaled_out[window + spec.horizon - 1: window + spec.horizon - 1 + n].astype(np.float32)[:, None]
    return Dataset(x[train_idx], y[train_idx], x[val_idx], y[val_idx], "regression", 1)


def _csv_table(spec: DataSpec, split_seed: int, sequence: bool) -> Dataset:
    import pandas as pd

    frame = pd.read_csv(spec.path)
    features = list(spec.features) if spec.features else [c for c in frame.columns if c != spec.target]
    try:
        x = frame[features].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise SpecError(spec.path, "data.features", f"feature columns must be numeric ({e}); "
                                                    "list numeric columns in features") from e
    if np.isnan(x).any():
        raise SpecError(spec.path, "data.features", "feature columns have empty cells; fill or drop them")
    if spec.task == "classification":
        labels, y = np.unique(frame[spec.target].astype(str).to_numpy(), return_inverse=True)
        return _table(spec, x, y.astype(np.int32), "classification", split_seed, sequence, n_classes=len(labels))
    y = pd.to_numeric(frame[spec.target], errors="coerce").to_numpy(dtype=np.float32)
    if np.isnan(y).any():
        raise SpecError(spec.path, "data.target", f'target "{spec.target}" has empty or non-numeric values; '
                                                  'clean it or set task = "classification"')
    return _table(spec, x, y[:, None], "regression", split_seed, sequence)


def _table(spec: DataSpec, x: np.ndarray, y: np.ndarray, task: str, split_seed: int, sequence: bool,
           steps: tuple[int, int] | None = None, n_classes: int | None = None) -> Dataset:
    n = len(x)
    n_val = max(1, int(round(n * spec.val_fraction)))
    if spec.effective_split == "chronological":
        train_idx, val_idx = np.arange(n - n_val), np.arange(n - n_val, n)
    else:
        order = np.random.default_rng(split_seed).permutation(n)
        train_idx, val_idx = order[n_val:], order[:n_val]
    scaler = _Scaler(spec.scaling, x[train_idx])
    x = scaler(x).astype(np.float32)
    if sequence:
        # Recurrent families read a table as a sequence: digits row by row, other tables
        # one feature per step.
        x = x.reshape((n, *steps)) if steps else x[..., None]
    n_outputs = (n_classes or int(y.max()) + 1) if task == "classification" else 1
    return Dataset(x[train_idx], y[train_idx], x[val_idx], y[val_idx], task, n_outputs)


def check_data(spec: StudySpec) -> None:
    """Build the spec's data once for every window its space can ask for, so that a bad
    CSV or a window longer than the series stops the run before any trial starts.

    Raises:
        SpecError: Naming the study file and the field.
    """
    if spec.model.family == "analytic":
        return
    p = spec.space.get("window")
    windows = ([p.value] if isinstance(p, Fixed) else list(p.choices) if isinstance(p, Choice)
               else [p.low, p.high] if isinstance(p, IntRange) else [spec.data.window])
    for window in windows:
        try:
            load_dataset(spec.data, window=window, sequence=spec.model.family in RECURRENT_FAMILIES,
                         split_seed=spec.seed)
        except SpecError as e:
            field = "space.window" if e.field == "data.window" and "window" in spec.space else e.field
            raise SpecError(spec.source, field, e.detail) from e
