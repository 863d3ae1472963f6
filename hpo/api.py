"""Python API: a spec (from a file, or built from a notebook's build function, arrays and
space) in; the same road as `hpo run` (seeded repeated fits, pruning, SQL) and the Optuna
study out.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from hpo import hooks
from hpo.errors import SpecError
from hpo.spec import StudySpec, load_spec, parse_spec
from hpo.storage import DEFAULT_STORAGE, get_storage, mask_url
from hpo.workers import RunSummary

__all__ = ["describe_start", "load_spec", "run", "start", "tune"]


def start(spec: StudySpec, storage: str = DEFAULT_STORAGE, *, timeout: float | None = None,
          max_failures: int = 5, heartbeat_interval: int | None = None, grace_period: int | None = None,
          max_memory_growth: float | None = None, echo: Callable[[str], None] = print
          ) -> tuple[optuna.Study, RunSummary]:
    """Check the spec, create (or join) its study and run trials in this process until the
    study holds its budget; what `hpo run` does without `--workers`.

    Returns:
        The Optuna study and what this run did.

    Raises:
        SpecError: The spec's data or model cannot be built; nothing was written.
    """
    from hpo.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL
    from hpo.study import create_study
    from hpo.training import check_spec_runs
    from hpo.workers import clear_stop, memory_growth_limit, run_trials

    check_spec_runs(spec)
    study = create_study(spec, get_storage(storage, heartbeat_interval=heartbeat_interval or HEARTBEAT_INTERVAL,
                                           grace_period=grace_period or GRACE_PERIOD))
    clear_stop(study)
    echo(describe_start(spec, storage))
    summary = run_trials(study, spec, budget=spec.trials, timeout=timeout, max_consecutive_failures=max_failures,
                         echo=echo, max_memory_growth_mb=memory_growth_limit(spec, max_memory_growth))
    return study, summary


def describe_start(spec: StudySpec, storage: str) -> str:
    """The line a run opens with: the study, where it is stored, its budget and objective."""
    return (f"study {spec.name} ({spec.source}) on {mask_url(storage)}: budget {spec.trials} trials, "
            f"{spec.seeds} seeds each, up to {spec.training.max_epochs} epochs, {spec.metric} "
            f"({spec.direction}), objective {spec.objective.mode}")


def run(spec: StudySpec | str | Path, storage: str = DEFAULT_STORAGE, *, trials: int | None = None,
        seeds: int | None = None, max_epochs: int | None = None, study_name: str | None = None,
        timeout: float | None = None, echo: Callable[[str], None] = print) -> optuna.Study:
    """Run a study (a `StudySpec`, or a study file's path or name) in this process.

    Args:
        spec: The study.
        storage: Database URL (SQLite by default).
        trials, seeds, max_epochs, study_name: Overrides, as on the command line.
        timeout: Stop starting trials after this many seconds.
        echo: Where progress lines go (`print`; `lambda line: None` for silence).

    Returns:
        The Optuna study, with every trial's per-seed record as user attributes.
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    spec = spec.with_overrides(seeds=seeds, max_epochs=max_epochs, trials=trials, name=study_name)
    study, _ = start(spec, storage, timeout=timeout, echo=echo, max_memory_growth=0)
    return study


def tune(build: Callable[..., Any] | str, *, data: Any, space: dict[str, Any] | None = None, seeds: int = 5,
         trials: int = 20, storage: str = DEFAULT_STORAGE, study_name: str | None = None, metric: str = "val_loss",
         max_epochs: int = 30, patience: int = 5, output: str | None = None, loss: str | None = None,
         seed: int = 0, sampler: str = "tpe", pruner: str = "median", backend: str | None = None,
         timeout: float | None = None, echo: Callable[[str], None] = print) -> optuna.Study:
    """Tune your own Keras model from Python, on the same road as `hpo run`.

    Args:
        build: `build(params, input_shape, n_outputs) -> keras.Model` (uncompiled), a
            KerasTuner-style `build(hp)` returning a compiled model (its `hp` calls are
            the space, its compile is kept), or a reference "file.py:build" /
            "package.module:build" to either.
        data: `(x_train, y_train, x_val, y_val)` arrays (or a dict with those keys), or a
            loader function returning them, or a reference "file.py:load".
        space: Name -> `(low, high)` (an int or float range), `(low, high, "log")`, a
            list (choices), or a fixed value. Vocabulary names (`learning_rate`,
            `batch_size`, `optimizer`, ...) configure hpo's compile and fit; every name
            reaches `build` in `params`. For a `build(hp)`: only how it is fed
            (`batch_size`), or nothing.
        seeds: Fits per trial, trained together.
        trials: Finished trials the study should end with.
        storage: Database URL.
        study_name: Defaults to the build function's name.
        metric: `val_loss`, `val_mae`, `val_mse` or `val_accuracy`.
        max_epochs, patience: Per-seed early stopping.
        output: "regression" or "classification" (default: from the metric).
        loss: A Keras loss name (default: mse, or sparse categorical cross-entropy).
        seed: Study seed: trial seeds are `seed*1000 + i`.
        sampler, pruner: As in a study file's `[sampler] kind` and `[pruner] kind`.
        backend: "jax" or "tensorflow" (default: `HPO_BACKEND`, else jax).
        timeout: Stop starting trials after this many seconds.
        echo: Where progress lines go.

    Returns:
        The Optuna study; each trial carries the user attributes `hpo run` writes.

    Raises:
        SpecError: A bad space, data or model, before any trial and before anything is
            written to the database.
    """
    source = f"hpo.tune({getattr(build, '__name__', build)})"
    name = study_name or getattr(build, "__name__", None) or "tune"
    model: dict[str, Any] = {"build": _function_ref(build, f"{name}.build")}
    code = _source_hash(build, model["build"])
    if code is not None:
        model["build_sha256"] = code
    if output is not None:
        model["output"] = output
    raw: dict[str, Any] = {
        "name": name, "metric": metric, "seeds": seeds, "seed": seed, "trials": trials,
        "model": model, "data": _data_table(data, name),
        "space": _space_table({} if space is None else space, source),
        "training": {"max_epochs": max_epochs, "patience": patience,
                     **({"loss": loss} if loss else {}), **({"backend": backend} if backend else {})},
        "sampler": {"kind": sampler}, "pruner": {"kind": pruner},
    }
    spec = parse_spec(raw, source=source, base_dir=Path.cwd())
    study, _ = start(spec, storage, timeout=timeout, echo=echo, max_memory_growth=0)
    return study


def _function_ref(fn: Callable[..., Any] | str, name: str) -> str:
    """A reference other processes can import where there is one; else the function is
    registered for this process only (`python:NAME`)."""
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise SpecError("hpo.tune", "build", f"expected a function or 'file.py:function', got {type(fn).__name__}")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname and "." not in qualname:
        try:
            if getattr(importlib.import_module(module), qualname, None) is fn:
                return f"{module}:{qualname}"
        except ImportError:
            pass
    return hooks.register(name, fn)


def _source_hash(fn: Any, ref: str) -> str | None:
    # A notebook function has no file to hash: its source stands in for it, so that the
    # same study name with changed code is refused like a changed build file. An
    # importable one is hashed by its module's file (parse_spec does it), as every worker
    # that imports it checks.
    if not ref.startswith(hooks.PYTHON_PREFIX) or not callable(fn):
        return None
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def _data_table(data: Any, name: str) -> dict[str, Any]:
    if isinstance(data, str) or callable(data):
        table: dict[str, Any] = {"loader": _function_ref(data, f"{name}.data")}
        code = _source_hash(data, table["loader"])
        if code is not None:
            table["loader_sha256"] = code
        return table
    arrays = tuple(data[k] for k in ("x_train", "y_train", "x_val", "y_val")) if isinstance(data, dict) else data
    if not isinstance(arrays, (tuple, list)):
        raise SpecError("hpo.tune", "data", f"expected (x_train, y_train, x_val, y_val), a dict of them or a loader, "
                                            f"got {type(data).__name__}")
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(a.tobytes())
    # The arrays themselves identify the data: the same study name with other arrays
    # is refused, like a changed spec.
    return {"loader": hooks.register(f"{name}.data", tuple(arrays)), "loader_sha256": digest.hexdigest()}


def _space_table(space: dict[str, Any], source: str) -> dict[str, Any]:
    if not isinstance(space, dict):
        raise SpecError(source, "space", f"expected a dict of name -> range, list or value, got {type(space).__name__}")
    table: dict[str, Any] = {}
    for name, value in space.items():
        if isinstance(value, tuple):
            if len(value) == 3 and value[2] == "log":
                table[name] = {"low": value[0], "high": value[1], "log": True}
            elif len(value) == 2:
                table[name] = {"low": value[0], "high": value[1]}
            else:
                raise SpecError(source, f"space.{name}", f"expected (low, high) or (low, high, \"log\"), got {value!r}")
        elif isinstance(value, list):
            table[name] = {"choices": value}
        else:
            table[name] = {"value": value}
    return table
