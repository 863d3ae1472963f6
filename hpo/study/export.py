"""Export: a finished trial of a stored study in; each seed's Keras model at its best epoch
(refitted exactly as the trial was fitted) and the seeds' ensemble out, as `.keras` files.

Nothing is kept while a study runs: a trial's fit is deterministic (`hpo replay` gives
identical scores), so the refit on the trial's own seeds, batched as they were, reaches
the same best epochs with the same weights, and the database stays small.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import OptionError, StudyNotFound
from hpo.record import (ATTR_ADDED_SCORES, ATTR_ADDED_SEEDS, ATTR_BACKEND, ATTR_FAIL_REASON, ATTR_PATH, ATTR_PRUNED_AT,
                        ATTR_SEEDS, ATTR_SEED_SCORES)
from hpo.specs import StudySpec
from hpo.specs.space import suggest_params
from hpo.store.storage import get_storage
from hpo.store.urls import existing_sqlite_path, resolve_storage_url
from hpo.study.study import load_study

SUFFIX = ".keras"


@dataclass
class SeedModel:
    """One seed's model at its best epoch; `stored` is what the study recorded for the
    seed, `score` what the model scores on the study's validation split now."""

    seed: int
    stored: float
    score: float
    model: Any


@dataclass
class TrialModels:
    """The models of one trial: one per seed, and the seeds' ensemble where asked for."""

    study_name: str
    number: int
    metric: str
    confirmed: bool
    # The trial's searched params (what hpo run prints), and every param its build saw.
    searched: dict[str, Any]
    params: dict[str, Any]
    seeds: list[SeedModel]
    refit_seconds: float
    ensemble: Any | None = None
    ensemble_score: float | None = None
    # The trial's seeds that were refitted beside the chosen ones (batched as in the search).
    also_refitted: list[int] = field(default_factory=list)

    @property
    def mean_score(self) -> float:
        return statistics.fmean(s.score for s in self.seeds)


@dataclass
class ExportPlan:
    """What an export refits: the study's spec, the trial, and the seeds wanted."""

    spec: StudySpec
    trial: FrozenTrial
    confirmed: bool
    groups: list[list[int]]
    stored: dict[int, float]
    wanted: list[int]
    ensemble: bool


def plan_export(storage_url: str, study_name: str, *, number: int | None = None, seed: int | None = None,
                ensemble: bool = False, study_dir: str | Path | None = None) -> ExportPlan:
    """Check an export before anything is refitted: the study, the trial (the winner by
    default: the best confirmed mean where `hpo confirm` ran, else the best objective
    value, as `hpo report` ranks them), the seed, and the build and loader code.

    Raises:
        OptionError: No complete trial, a trial that was pruned or failed, a seed the
            trial did not use, an ensemble of one seed.
        SpecError: The build or loader code changed since the study ran (both hashes named).
        StudyNotFound: No such study.
    """
    import dataclasses

    from hpo.train.fit import check_spec_runs

    storage_url = resolve_storage_url(storage_url)
    existing_sqlite_path(storage_url)  # a read creates no empty database
    study, spec = load_study(get_storage(storage_url, command="export"), study_name)
    if spec.model.family == "analytic":
        raise OptionError("--study-name", f"study {study_name} fits analytic curves, not Keras models: "
                                          "there is no model to export")
    if study_dir is not None:
        spec = dataclasses.replace(spec, base_dir=str(Path(study_dir).resolve()))
    trial, confirmed = _pick_trial(storage_url, study, spec, number)
    groups, stored = _seed_groups(spec, trial)
    if seed is not None and seed not in stored:
        raise OptionError("--seed", f"trial #{trial.number} of {study_name} was fitted on seeds "
                                    f"{', '.join(map(str, stored))}, not {seed}; give one of those")
    wanted = list(stored) if seed is None else [seed]
    if ensemble and len(wanted) < 2:
        raise OptionError("--ensemble", f"an ensemble averages two or more seeds; leave out --seed to average "
                                        f"the trial's {len(stored)} seeds")
    if ensemble and spec.data.resample_split:
        raise OptionError("--ensemble", f"study {study_name} resamples its split per seed, so one seed's validation "
                                        "data is another's training data: an ensemble has no honest validation score")
    # The hooks' code must be the code the trial was fitted with.
    check_spec_runs(spec)
    return ExportPlan(spec, trial, confirmed, groups, stored, wanted, ensemble)


def rebuild_models(plan: ExportPlan) -> TrialModels:
    """Refit the plan's trial and return each wanted seed's model at its best epoch, as
    `EarlyStopping(restore_best_weights=True)` leaves it, scored again on the study's
    validation split; with `plan.ensemble`, also the model averaging them.

    Only the batches of seeds that hold a wanted seed are refitted, each as it was trained.
    """
    from hpo.train.fit import fit_repeats

    spec, trial, wanted = plan.spec, plan.trial, plan.wanted
    params = suggest_params(spec, optuna.trial.FixedTrial(trial.params, number=trial.number))
    path = trial.user_attrs.get(ATTR_PATH)
    start = time.perf_counter()
    weights: dict[int, list] = {}
    refitted: list[int] = []
    for group in plan.groups:
        if not set(group) & set(wanted):
            continue
        fit = fit_repeats(spec, params, group, None, path=path if path in ("vectorized", "sequential") else None,
                          backend=trial.user_attrs.get(ATTR_BACKEND), keep_best=True)
        weights.update(zip(group, fit.best_weights))
        refitted += group
    seconds = time.perf_counter() - start
    models = []
    for s in wanted:
        model, data = _seed_model(spec, params, s, weights[s])
        models.append(SeedModel(s, plan.stored[s], score_model(model, data.x_val, data.y_val, spec.metric,
                                                               params["batch_size"]), model))
    result = TrialModels(spec.name, trial.number, spec.metric, plan.confirmed, dict(trial.params), params, models,
                         seconds,
                         also_refitted=[s for s in refitted if s not in wanted])
    if plan.ensemble:
        data = _trial_data(spec, params, wanted[0])
        result.ensemble = ensemble_model([m.model for m in models])
        result.ensemble_score = score_model(result.ensemble, data.x_val, data.y_val, spec.metric,
                                            params["batch_size"])
    return result


def _pick_trial(storage_url: str, study: optuna.Study, spec: StudySpec, number: int | None
                ) -> tuple[FrozenTrial, bool]:
    if number is None:
        from hpo.reports.report import build_report
        from hpo.store.urls import proxy_address

        if proxy_address(storage_url) is not None:
            raise OptionError("--trial", "through a storage proxy, name the trial to export (choosing the winner "
                                         "reads the report's tables): --trial N, or pass the database's URL")

        # One ranking of trials everywhere: hpo report's (confirmed mean first).
        report = build_report(storage_url, study.study_name, top=1)
        if report.top.empty:
            raise OptionError("--study-name", f"study {study.study_name} has no complete trial to export yet; "
                                              f"run it (hpo run) or join it (hpo worker) until one completes")
        number = int(report.top["number"].iloc[0])
        confirmed = bool(report.top["confirmation"].iloc[0] is not None)
    else:
        confirmed = False
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    if trial is None:
        raise OptionError("--trial", f"study {study.study_name} has no trial #{number}; its trials are "
                                     f"#0 to #{max(trials)}" if trials else f"study {study.study_name} has no trials")
    if trial.state != TrialState.COMPLETE or ATTR_SEED_SCORES not in trial.user_attrs:
        complete = [n for n, t in sorted(trials.items()) if t.state == TrialState.COMPLETE]
        hint = (f"export a complete one ({', '.join(f'#{n}' for n in complete[:10])}), or leave out --trial for "
                "the winner" if complete else "no trial of this study is complete yet")
        raise OptionError("--trial", f"trial #{number} of {study.study_name} {_not_complete(trial)}, so it has no "
                                     f"best model; {hint}")
    return trial, confirmed


def _not_complete(trial: FrozenTrial) -> str:
    if trial.state == TrialState.PRUNED:
        return f"was pruned after epoch {trial.user_attrs.get(ATTR_PRUNED_AT, '?')}"
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get(ATTR_FAIL_REASON)
        return "failed" + (f" ({reason[:120]})" if reason else "")
    if trial.state == TrialState.COMPLETE:
        return "holds no per-seed record"
    return f"is {trial.state.name.lower()}"


def _seed_groups(spec: StudySpec, trial: FrozenTrial) -> tuple[list[list[int]], dict[int, float]]:
    """The trial's seeds in the batches they were trained in (the first `seeds`, then
    batches of `seeds` added by a race or to the incumbent), and each seed's stored score.

    A batch is refitted as it was trained: replicas trained together are bit-identical
    to the search's only in the same company.
    """
    a = trial.user_attrs
    seeds, added = list(a[ATTR_SEEDS]), list(a.get(ATTR_ADDED_SEEDS) or [])
    size = spec.seeds
    groups = [seeds[i:i + size] for i in range(0, len(seeds), size)]
    groups += [added[i:i + size] for i in range(0, len(added), size)]
    scores = list(a[ATTR_SEED_SCORES]) + list(a.get(ATTR_ADDED_SCORES) or [])
    return groups, dict(zip(seeds + added, scores))


def _trial_data(spec: StudySpec, params: dict[str, Any], seed: int) -> Any:
    from hpo.train.data import load_trial_data

    return load_trial_data(spec, params, seed if spec.data.resample_split else spec.seed)


def _seed_model(spec: StudySpec, params: dict[str, Any], seed: int, weights: list) -> tuple[Any, Any]:
    import keras

    from hpo.train.fit import build_trial_model

    data = _trial_data(spec, params, seed)
    keras.utils.set_random_seed(seed)
    model = build_trial_model(spec, params, data)
    model._symbolic_build(data_batch=(data.x_train[: params["batch_size"]], data.y_train[: params["batch_size"]]))
    model.set_weights(weights)
    # Nested in an ensemble, each seed's model needs a name of its own.
    model.name = f"seed_{seed}"
    return model, data


def score_model(model: Any, x: Any, y: Any, metric: str, batch_size: int) -> float:
    """The model's `metric` (`val_loss`, `val_accuracy`, ...) on (x, y), evaluated batch by
    batch as `fit(validation_data=...)` does."""
    logs = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return float(logs[metric.removeprefix("val_")])


def ensemble_model(models: list[Any]) -> Any:
    """One Keras model whose output is the mean of the models' outputs (a mean of
    regressions, or of class probabilities), compiled as the first one is."""
    import keras

    first = models[0]
    inputs = keras.Input(batch_shape=tuple(first.inputs[0].shape), dtype=first.inputs[0].dtype)
    outputs = keras.layers.Average(name="seed_mean")([m(inputs) for m in models])
    ensemble = keras.Model(inputs, outputs, name=f"ensemble_of_{len(models)}_seeds")
    ensemble.compile_from_config(first.get_compile_config())
    return ensemble


def custom_classes(model: Any) -> list[str]:
    """Classes in the model that are not Keras' own (a custom layer, a Lambda): loading its
    file needs them registered, or `custom_objects` (a Lambda: `safe_mode=False`)."""
    found = {f"{type(obj).__module__}.{type(obj).__name__}" for obj in [model, *model._flatten_layers()]
             if not type(obj).__module__.startswith("keras.") or type(obj).__name__ == "Lambda"}
    return sorted(found)


def output_files(result: TrialModels, output: Path) -> dict[str, Any]:
    """File name -> model: one file per seed (and the ensemble) in a folder, or the one
    model a `FILE.keras` holds.

    Raises:
        OptionError: A `.keras` file for several models.
    """
    if output.suffix == SUFFIX:
        if result.ensemble is not None:
            return {output.name: result.ensemble}
        if len(result.seeds) == 1:
            return {output.name: result.seeds[0].model}
        raise _one_file_error(output, [m.seed for m in result.seeds])
    files = {f"trial{result.number}-seed{m.seed}{SUFFIX}": m.model for m in result.seeds}
    if result.ensemble is not None:
        files[f"trial{result.number}-ensemble{SUFFIX}"] = result.ensemble
    return files


def _one_file_error(output: Path, seeds: list[int]) -> OptionError:
    return OptionError("--output", f"{output} holds one model but the trial has {len(seeds)} seeds; give --seed K "
                                   f"(one of {', '.join(map(str, seeds))}), --ensemble, or a folder for all of them")


def check_output(output: Path, n_models: int, seeds: list[int]) -> None:
    """Refuse, before any refit, an output that cannot be written: a folder that does not
    exist or refuses writes, a `.keras` file for several models, a folder that is a file.

    Raises:
        OptionError: Naming the path and the fix.
    """
    if output.suffix == SUFFIX:
        if n_models > 1:
            raise _one_file_error(output, seeds)
        folder = output.parent
        if output.is_dir():
            raise OptionError("--output", f"{output} is a folder; give a new FILE.keras, or a folder without .keras")
    else:
        if output.exists() and not output.is_dir():
            raise OptionError("--output", f"{output} is a file, not a folder; give a folder, or a FILE.keras")
        folder = output if output.is_dir() else output.parent
    if not folder.is_dir():
        raise OptionError("--output", f"folder {folder} does not exist; create it first (mkdir -p {folder})")
    try:
        handle, probe = tempfile.mkstemp(prefix=".hpo-export-", dir=folder)
    except OSError as e:
        raise OptionError("--output", f"cannot write in folder {folder} ({e.strerror}); choose a folder you "
                                      "may write to") from e
    os.close(handle)
    os.unlink(probe)


def save_models(files: dict[str, Any], output: Path) -> list[Path]:
    """Save each model in Keras' native format, all or nothing: every file is written
    under a temporary name first and renamed into place only once all are written."""
    single = output.suffix == SUFFIX
    folder = output.parent if single else output
    new_folder = not single and not output.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=folder.parent if new_folder else folder))
    try:
        for name, model in files.items():
            model.save(staging / name)
        if new_folder:
            # mkdtemp makes a private folder; the new one gets the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)
            staging.rename(output)
            return [output / name for name in files]
        for name in files:
            os.replace(staging / name, folder / name)
        return [folder / name for name in files]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(storage_url: str, study_name: str, output: str | Path, *, number: int | None = None,
           seed: int | None = None, ensemble: bool = False, study_dir: str | Path | None = None
           ) -> tuple[TrialModels, list[Path]]:
    """`hpo export`: check the output, refit, save; the models and the files written.

    Raises:
        OptionError, SpecError, StudyNotFound: As `plan_export` and `check_output`; nothing written.
    """
    output = Path(output)
    plan = plan_export(storage_url, study_name, number=number, seed=seed, ensemble=ensemble, study_dir=study_dir)
    check_output(output, 1 if ensemble else len(plan.wanted), plan.wanted)
    result = rebuild_models(plan)
    return result, save_models(output_files(result, output), output)


def validation_split(storage: str, study_name: str, number: int, seed: int | None = None) -> tuple[Any, Any, int]:
    """(x_val, y_val, batch_size) of a trial, as its seeds were validated: to score a
    model loaded from an exported file.

    Raises:
        StudyNotFound: No such study or trial.
    """
    storage = resolve_storage_url(storage)
    existing_sqlite_path(storage)
    study, spec = load_study(get_storage(storage, command="export"), study_name)
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials:
        raise StudyNotFound(f"study {study_name} has no trial #{number}")
    params = suggest_params(spec, optuna.trial.FixedTrial(trials[0].params, number=number))
    data = _trial_data(spec, params, seed if seed is not None else spec.seed)
    return data.x_val, data.y_val, params["batch_size"]
