"""Datasets: a `DataSpec` (plus the trial's window) in, scaled train/validation arrays out.

Built-in data is generated or ships with scikit-learn, so nothing is downloaded; scaling
is fitted on the training split only, and the split is fixed unless the spec resamples it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpo.backend import import_tensorflow_quietly
from hpo.errors import SpecError
from hpo.specs import (CUSTOM, DATA_PARAMS, LOADER, RECURRENT_FAMILIES, SERIES_DATASETS, Choice, DataSpec, Fixed,
                       IntRange, StudySpec, resolve_data_path)
from hpo.words import plural

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
                 split_seed: int = 0, maxlen: int | None = None, vocab_size: int | None = None) -> Dataset:
    """Build the train/validation arrays for one fit.

    Args:
        spec: The study's `[data]` table.
        window: Input length for series data; the spec's `window` when None.
        sequence: True for recurrent families, whose inputs are `(n, steps, features)`.
        split_seed: Seed of a random split (the study seed, or the fit's seed when the
            spec resamples the split per seed).
        maxlen, vocab_size: Tokens per text and vocabulary of a `csv_text` dataset; the
            spec's when None.
    """
    return _load_cached(spec, window or spec.window, sequence, split_seed, maxlen or spec.maxlen,
                        vocab_size or spec.vocab_size)


def load_trial_data(spec: StudySpec, params: dict[str, Any], split_seed: int | None = None) -> Dataset:
    """A trial's arrays: the user's loader's, or the built-in dataset shaped by the params
    (window, maxlen, vocab_size) for the spec's model family.

    Args:
        spec: The study.
        params: Resolved params.
        split_seed: Seed of a random split; the study seed when None.
    """
    if spec.data.name == LOADER:
        return _user_arrays(spec)
    return load_dataset(_located(spec), sequence=_wants_sequence(spec), split_seed=spec.seed if split_seed is None else split_seed,
                        **{name: params.get(name) for name in DATA_PARAMS})


def _located(spec: StudySpec) -> DataSpec:
    # A data file's stored path is relative to the study file's folder on this machine.
    if spec.data.path is None:
        return spec.data
    return dataclasses.replace(spec.data, path=str(resolve_data_path(spec.data.path, spec.base_dir)))


def _wants_sequence(spec: StudySpec) -> bool:
    # Recurrent families read every dataset as steps; a user's model gets series as
    # (steps, 1) windows and tables as rows of features.
    if spec.model.family == CUSTOM:
        return spec.data.name in SERIES_DATASETS
    return spec.model.family in RECURRENT_FAMILIES


@functools.lru_cache(maxsize=16)
def _load_cached(spec: DataSpec, window: int, sequence: bool, split_seed: int, maxlen: int,
                 vocab_size: int) -> Dataset:
    if spec.name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.data.astype(np.float32)
        return _table(spec, x, digits.target.astype(np.int32), "classification", split_seed, sequence,
                      steps=(8, 8))
    if spec.name == "csv_table":
        return _csv_table(spec, split_seed, sequence)
    if spec.name == "csv_text":
        return _csv_text(spec, split_seed, maxlen, vocab_size)
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
    if n < 4:
        # Name the field that is wrong: the horizon when the window alone would leave
        # enough samples, or when it is too far ahead even for a window of one point.
        if len(inputs) - window >= 4 or len(inputs) - spec.horizon < 4:
            raise SpecError("<data>", "data.horizon", f"horizon {spec.horizon} with window {window} leaves {max(n, 0)} "
                                                      f"samples from {len(inputs)} points; shorten the horizon")
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
        _refuse_empty_cells(frame, spec.target, spec.path, "data.target", "give every row a class")
        labels, y = np.unique(frame[spec.target].astype(str).to_numpy(), return_inverse=True)
        return _table(spec, x, y.astype(np.int32), "classification", split_seed, sequence, n_classes=len(labels))
    y = pd.to_numeric(frame[spec.target], errors="coerce").to_numpy(dtype=np.float32)
    if np.isnan(y).any():
        raise SpecError(spec.path, "data.target", f'target "{spec.target}" has empty or non-numeric values; '
                                                  'clean it or set task = "classification"')
    return _table(spec, x, y[:, None], "regression", split_seed, sequence)


def _csv_text(spec: DataSpec, split_seed: int, maxlen: int, vocab_size: int) -> Dataset:
    import keras
    import pandas as pd

    frame = pd.read_csv(spec.path, dtype={spec.text_column: str})
    texts = frame[spec.text_column].fillna("").astype(str).to_numpy()
    if not any(t.strip() for t in texts):
        raise SpecError(spec.path, "data.text_column", f'column "{spec.text_column}" of {spec.path} has no text (every '
                                                       "cell is empty); name the column that holds the texts")
    _refuse_empty_cells(frame, spec.label_column, spec.path, "data.label_column", "give every row a label")
    labels, y = np.unique(frame[spec.label_column].astype(str).to_numpy(), return_inverse=True)
    if len(labels) < 2:
        raise SpecError(spec.path, "data.label_column", f'column "{spec.label_column}" holds one label only; '
                                                        "a classifier needs at least two")
    n = len(texts)
    n_val = max(1, int(round(n * spec.val_fraction)))
    order = np.random.default_rng(split_seed).permutation(n)
    train_idx, val_idx = order[n_val:], order[:n_val]
    # The vocabulary is learnt from the training texts only, like any scaling. Keras'
    # text layers run on TensorFlow, whatever the backend.
    import_tensorflow_quietly()
    vectorize = keras.layers.TextVectorization(max_tokens=vocab_size, output_sequence_length=maxlen)
    vectorize.adapt(list(texts[train_idx]))
    x = np.asarray(vectorize(list(texts))).astype(np.int32)
    y = y.astype(np.int32)
    return Dataset(x[train_idx], y[train_idx], x[val_idx], y[val_idx], "classification", len(labels))


def _refuse_empty_cells(frame: Any, column: str, path: str, field: str, fix: str) -> None:
    empty = np.flatnonzero(frame[column].isna().to_numpy())
    if len(empty):
        # Line numbers of the file: the header is line 1.
        lines = ", ".join(str(i + 2) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise SpecError(path, field, f'column "{column}" of {path} has {plural(len(empty), "empty cell")} '
                                     f"(line {lines}); {fix} or drop those rows")


_user_cache: dict[tuple, Dataset] = {}


def _user_arrays(spec: StudySpec) -> Dataset:
    """The user's loader called once per process (per code version), its arrays checked."""
    from hpo.specs import hooks

    data = spec.data
    key = (data.loader, data.loader_sha256)
    if key not in _user_cache:
        load = hooks.load_hook(data.loader, None if spec.base_dir is None else Path(spec.base_dir), spec.source,
                               "data.loader", sha256=data.loader_sha256, parameters=0)
        try:
            arrays = load() if callable(load) else load
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's loader failing is a data error
            raise SpecError(spec.source, "data.loader", f"{data.loader} raised {type(e).__name__}: {e}; fix it") from e
        # Arrays handed to hpo.tune: the argument is at fault, not a loader.
        ref, field = (data.loader, "data.loader") if callable(load) else ("the data= argument", "data")
        checked = check_arrays(arrays, spec.source, ref, spec.output, field)
        _check_sample_shape(spec, checked, ref, field)
        _user_cache[key] = checked
    return _user_cache[key]


def _check_sample_shape(spec: StudySpec, data: Dataset, ref: str, field: str) -> None:
    # A built-in family's first layer needs (samples, steps, features) or (samples,
    # features); Keras would say "expected ndim=3, found ndim=1" about the model.
    need = 3 if spec.model.family in RECURRENT_FAMILIES else 2 if spec.model.family == "mlp" else None
    have = data.x_train.ndim
    if need is None or have == need or (need == 2 and have > 2):
        return
    shape = "(samples, steps, features)" if need == 3 else "(samples, features)"
    fix = "x.reshape(len(x), -1, 1): one feature per step" if need == 3 else "x.reshape(len(x), -1)"
    raise SpecError(spec.source, field, f"{ref}: x_train has shape {data.x_train.shape}, but the "
                                        f"{spec.model.family} family reads {shape}; reshape x_train and x_val ({fix})")


def check_arrays(arrays: Any, source: str, ref: str, task: str, field: str = "data.loader") -> Dataset:
    """(x_train, y_train, x_val, y_val), or a dict with those keys, as a checked `Dataset`.

    Args:
        arrays: What the loader returned, or what was passed as `data=`.
        source, field: Where the data was named, for error messages.
        ref: How the messages name the arrays' origin (the loader's reference, or the argument).
        task: The study's output kind.

    Raises:
        SpecError: Naming the study and the loader, and what is wrong: not four arrays, lengths or sample
            shapes that disagree, non-numeric dtypes, or values that are not finite.
    """
    names = ("x_train", "y_train", "x_val", "y_val")
    if isinstance(arrays, dict):
        missing = [k for k in names if k not in arrays]
        if missing:
            raise SpecError(source, field, f"{ref}: the dict lacks {', '.join(missing)}; give keys {', '.join(names)}")
        arrays = tuple(arrays[k] for k in names)
    if not isinstance(arrays, (tuple, list)) or len(arrays) != 4:
        raise SpecError(source, field, f"{ref}: expected (x_train, y_train, x_val, y_val), got {type(arrays).__name__}"
                                              f"{'' if not isinstance(arrays, (tuple, list)) else f' of {len(arrays)}'}; "
                                              "give those four arrays")
    xt, yt, xv, yv = (np.asarray(a) for a in arrays)
    for name, a in zip(names, (xt, yt, xv, yv)):
        if a.dtype.kind not in "biuf":
            raise SpecError(source, field, f"{ref}: {name} has dtype {a.dtype}; give numbers (tokenise text first)")
        if a.ndim == 0 or len(a) == 0:
            raise SpecError(source, field, f"{ref}: {name} is empty; give at least one sample")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise SpecError(source, field, f"{ref}: {name} holds {int((~np.isfinite(a)).sum())} NaN or infinite "
                                                  "values; fill or drop them")
    for x, y, split in ((xt, yt, "train"), (xv, yv, "val")):
        if len(x) != len(y):
            raise SpecError(source, field, f"{ref}: x_{split} has {len(x)} samples but y_{split} {len(y)}; make them agree")
    if xt.shape[1:] != xv.shape[1:]:
        raise SpecError(source, field, f"{ref}: x_train samples are {xt.shape[1:]} but x_val samples {xv.shape[1:]}; "
                                              "make them agree")
    x_dtype = np.int32 if xt.dtype.kind in "biu" else np.float32
    if task == "classification":
        if yt.dtype.kind == "f" and not (np.mod(yt, 1) == 0).all():
            raise SpecError(source, field, f"{ref}: a classification target must hold class numbers 0..K-1, "
                                                  "got fractions; give integer labels or use a regression output")
        labels = np.concatenate([yt.ravel(), yv.ravel()]).astype(np.int64)
        if labels.min() < 0:
            raise SpecError(source, field, f"{ref}: class labels must be 0..K-1, got a negative one")
        if labels.min() > 0:
            # Else the head would get a class that never occurs (labels 1..10 read as 11 classes).
            raise SpecError(source, field, f"{ref}: class labels run from {labels.min()} to {labels.max()}, but must "
                                           f"run from 0 to K-1 (no sample has class 0); subtract {labels.min()} from "
                                           "y_train and y_val")
        return Dataset(xt.astype(x_dtype), yt.reshape(len(yt)).astype(np.int32), xv.astype(x_dtype),
                       yv.reshape(len(yv)).astype(np.int32), "classification", int(labels.max()) + 1)
    yt2 = yt.reshape(len(yt), -1).astype(np.float32)
    yv2 = yv.reshape(len(yv), -1).astype(np.float32)
    if yt2.shape[1] != yv2.shape[1]:
        raise SpecError(source, field, f"{ref}: y_train has {yt2.shape[1]} outputs but y_val {yv2.shape[1]}; make them agree")
    return Dataset(xt.astype(x_dtype), yt2, xv.astype(x_dtype), yv2, "regression", yt2.shape[1])


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
    if spec.data.name == LOADER:
        _user_arrays(spec)
        return
    p = spec.space.get("window")
    windows = ([p.value] if isinstance(p, Fixed) else list(p.choices) if isinstance(p, Choice)
               else [p.low, p.high] if isinstance(p, IntRange) else [spec.data.window])
    for window in windows:
        try:
            load_dataset(_located(spec), window=window, sequence=_wants_sequence(spec), split_seed=spec.seed)
        except SpecError as e:
            field = "space.window" if e.field == "data.window" and "window" in spec.space else e.field
            raise SpecError(spec.source, field, e.detail) from e
