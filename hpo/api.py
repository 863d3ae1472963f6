"""Python API: a spec (from a file, or built from a notebook's build function, arrays and
space) in; the same road as `hpo run` (seeded repeated fits, pruning, SQL) and the Optuna
study out.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import shlex
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from hpo.errors import SpecError
from hpo.specs import StudySpec, hooks, load_spec, parse_spec
from hpo.store.urls import DEFAULT_STORAGE, mask_url, proxy_address
from hpo.study.run import describe_start
from hpo.study.workers import RunSummary
from hpo.words import format_params, mean_std, noun_for, plural

__all__ = ["best_models", "describe_start", "load_spec", "report", "run", "start", "storage_arg", "summary_lines", "tune"]


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
        OptionError: The grace period is not longer than the heartbeat interval.
        StorageError: The database cannot be reached or opened.
    """
    from hpo.study.run import run_study
    from hpo.study.study import quiet_optuna

    # Our lines say what happened, as in `hpo run`; the caller's Optuna verbosity comes back after.
    verbosity = optuna.logging.get_verbosity()
    quiet_optuna()
    try:
        return run_study(spec, storage, timeout=timeout, max_failures=max_failures,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                         max_memory_growth=max_memory_growth, echo=echo)
    finally:
        optuna.logging.set_verbosity(verbosity)


def storage_arg(storage: str) -> str:
    """` --storage URL` for a printed command, unless it is the default (password masked)."""
    # Quoted so the printed command runs as printed, whatever the path holds.
    return "" if storage == DEFAULT_STORAGE else f" --storage {shlex.quote(mask_url(storage))}"


def summary_lines(spec: StudySpec, summary: RunSummary, storage: str) -> list[str]:
    """The lines a run closes with: what it did, the best trial (mean ± std over its seeds,
    per-seed scores, params), where it is stored and how to replay and export it."""
    lines = ["", f"done in {summary.seconds:.1f} s: {summary.complete} complete, {summary.pruned} pruned, "
                 f"{summary.failed} failed in this run" + (f", {summary.lost} lost and retried" if summary.lost else "")]
    if summary.stopped_reason:
        lines.append(summary.stopped_reason)
    elif not (summary.complete or summary.pruned or summary.failed or summary.lost or summary.exit_code):
        # Nothing ran because nothing was left to run: say so, and how to go on.
        lines.append(f"the study's budget of {plural(spec.trials, 'trial')} was spent already; to add trials, run it again "
                     f"with --trials N (more than {spec.trials})")
    best = summary.best
    if best is None:
        return lines + ["no complete trial yet"]
    a = best.user_attrs
    lines.append(f"best trial #{best.number}: {spec.metric} {mean_std(a['mean'], a['std'], len(a['seeds']))} "
                 f"over {noun_for(len(a['seeds']), 'seed')} {a['seeds']} "
                 f"(per seed: {', '.join(f'{s:.4g}' for s in a['seed_scores'])})")
    # In the space's order: a trial read back through a storage proxy has its params in any order.
    order = {name: i for i, name in enumerate(spec.space)}
    lines.append(f"params: {format_params(dict(sorted(best.params.items(), key=lambda p: order.get(p[0], len(order)))))}")
    name, where = shlex.quote(spec.name), storage_arg(storage)
    if any(ref.startswith(hooks.PYTHON_PREFIX) for ref in (spec.model.build or "", spec.data.loader or "")):
        # A function handed over from a notebook is importable only in this process: no
        # other command can refit the trial, so none is offered.
        lines.append(f"its models: hpo.best_models({mask_url(storage)!r}, {spec.name!r}) in this Python process")
        lines.append(f"stored in {mask_url(storage)} (study {spec.name})")
        return lines
    if spec.model.family != "analytic":
        # Through a storage proxy the winner cannot be chosen (that reads the report): name it.
        trial = f" --trial {best.number}" if proxy_address(storage) is not None else ""
        lines.append(f"export its models with: hpo export --study-name {name}{where}{trial} "
                     f"-o {shlex.quote(spec.name)}-models")
    # Last: a command to copy from the end of the output.
    lines.append(f"stored in {mask_url(storage)} (study {spec.name}); "
                 f"replay it with: hpo replay --study-name {name}{where} {best.number}")
    return lines


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
    study, summary = start(spec, storage, timeout=timeout, echo=echo, max_memory_growth=0)
    for line in summary_lines(spec, summary, storage):
        echo(line)
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
    study, summary = start(spec, storage, timeout=timeout, echo=echo, max_memory_growth=0)
    for line in summary_lines(spec, summary, storage):
        echo(line)
    return study


def best_models(storage: str, study_name: str, *, trial: int | None = None, seed: int | None = None,
                ensemble: bool = False) -> list[Any]:
    """The trained Keras models of a study's winner (or of `trial`): one per seed at its
    best epoch, as `hpo export` saves them (KerasTuner's `tuner.get_best_models()`).

    Args:
        storage: The study database URL.
        study_name: The study.
        trial: A complete trial's number; None: the winner (the best confirmed mean where
            `hpo confirm` ran, else the best objective value).
        seed: Only this seed's model.
        ensemble: Return `[ensemble]`: one model averaging the seeds' outputs.

    Raises:
        OptionError: No complete trial, a pruned or failed trial, a seed it did not use.
        SpecError: The build or loader code changed since the study ran.
    """
    from hpo.study.export import plan_export, rebuild_models

    result = rebuild_models(plan_export(storage, study_name, number=trial, seed=seed, ensemble=ensemble))
    return [result.ensemble] if ensemble else [m.model for m in result.seeds]


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


class StudyReport:
    """`hpo report` for a notebook: its text as the repr, and an HTML table with the
    plots inline (PNG data URIs) where the notebook renders HTML."""

    def __init__(self, storage: str, study_name: str, top: int = 5) -> None:
        from hpo.reports.report import build_report

        self.storage, self.study_name = storage, study_name
        self.report = build_report(storage, study_name, top)
        self._html: str | None = None

    def __repr__(self) -> str:
        from hpo.reports.report import format_report

        return format_report(self.report)

    def _repr_html_(self) -> str:
        if self._html is None:
            self._html = self._render_html()
        return self._html

    def _render_html(self) -> str:
        import html

        from hpo.reports.report import _narrow, format_report

        r = self.report
        text = format_report(r, wide=True).split("\n")
        parts = [f"<h4>{html.escape(text[0])}</h4>", _narrow(r.top).to_html(index=False, escape=True)]
        # The prose after the table: the best-vs-runner-up test and the expected-best line.
        blank = [i for i, line in enumerate(text) if not line.strip()]
        parts += [f"<p>{html.escape(line)}</p>" for line in text[blank[-1] + 1:] if line.strip()] if blank else []
        parts += [f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}" style="max-width:100%">'
                  for alt, png in self._plots()]
        return "\n".join(parts)

    def _plots(self) -> list[tuple[str, str]]:
        import base64
        import tempfile

        from hpo.reports.plots import PlotError, plot_expected_best, plot_learning_curves, plot_seed_scores

        top = self.report.top
        plots = [("per-seed scores of the top trials",
                  lambda out: plot_seed_scores(self.storage, self.study_name, out, top=max(len(top), 1)))]
        if len(top):
            best = int(top["number"].iloc[0])
            plots.append((f"learning curves of trial {best}",
                          lambda out: plot_learning_curves(self.storage, self.study_name, best, out)))
        plots.append(("expected best vs trials", lambda out: plot_expected_best(self.storage, self.study_name, out)))
        drawn = []
        with tempfile.TemporaryDirectory() as folder:
            for i, (alt, draw) in enumerate(plots):
                try:
                    path = draw(Path(folder) / f"{i}.png")
                except PlotError:
                    continue
                drawn.append((alt, base64.b64encode(path.read_bytes()).decode("ascii")))
        return drawn


def report(study: optuna.Study | str, storage: str | None = None, *, top: int = 5) -> StudyReport:
    """`hpo report` for a notebook: the top trials with mean ± std, bootstrap CI, seeds,
    confirmation and diagnosis, best vs runner-up, expected best vs trials, and plots.

    Args:
        study: The study `hpo.tune` or `hpo.run` returned, or a study name.
        storage: The database URL (with a study name; default: `HPO_STORAGE`, else SQLite).
        top: Trials to list.

    Returns:
        An object that prints as `hpo report` does and renders as HTML (table and plots)
        in a notebook.

    Raises:
        StudyNotFound: No such study.
    """
    from hpo.store.storage import rdb_storage
    from hpo.store.urls import resolve_storage_url

    if isinstance(study, optuna.Study):
        return StudyReport(rdb_storage(study._storage).url, study.study_name, top)
    return StudyReport(resolve_storage_url(storage), study, top)
