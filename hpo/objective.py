"""The Optuna objective: a trial in; suggested params, repeated seeded fits, pruning
reports and the per-seed record out, with the mean (or mean and std) as its value.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optuna

from hpo.diagnosis import trial_note
from hpo.errors import TrialFailed
from hpo.space import suggest_params
from hpo.spec import StudySpec
from hpo.training import RepeatFit, fit_repeats, release_memory

# User attribute names people and our SQL views rely on.
ATTR_MEAN = "mean"
ATTR_STD = "std"
ATTR_SEED_SCORES = "seed_scores"
ATTR_SEEDS = "seeds"
ATTR_BEST_EPOCHS = "best_epochs"
ATTR_EPOCHS_RUN = "epochs_run"
ATTR_FIT_SECONDS = "fit_seconds"
ATTR_CURVES = "curves"
ATTR_PATH = "training_path"
ATTR_FAIL_REASON = "fail_reason"
ATTR_PRUNED_AT = "pruned_at_epoch"
# Set on a trial given back because its worker was stopped (it does not count).
ATTR_INTERRUPTED = "interrupted"


class Objective:
    """Fits a trial's params once per seed and returns the objective value(s).

    A pruned trial keeps the record of the epochs it ran; a failed one (NaN loss, or an
    exception while building or fitting) stores the reason in `fail_reason` and raises
    `TrialFailed`, which the worker catches before going on to the next trial.
    """

    def __init__(self, spec: StudySpec, check_stop: Callable[[], None] = lambda: None) -> None:
        """Args:
            spec: The study's spec.
            check_stop: Called after every epoch; raises (a `BaseException`) to stop the
                trial there, e.g. when the worker received SIGTERM.
        """
        self.spec = spec
        self.check_stop = check_stop

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        spec = self.spec
        seeds = spec.seed_values
        trial.set_user_attr(ATTR_SEEDS, seeds)
        on_epoch = _Reporter(trial, self.check_stop, report=not spec.is_multi_objective)
        try:
            # Inside the try: a fault while suggesting fails this trial, not the worker.
            params = suggest_params(spec, trial)
            fit = fit_repeats(spec, params, seeds, on_epoch)
        except TrialFailed as e:
            trial.set_user_attr(ATTR_FAIL_REASON, str(e))
            raise
        except Exception as e:  # noqa: BLE001 - any fault in user-shaped code fails this trial only
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr(ATTR_FAIL_REASON, reason[:2000])
            raise TrialFailed(reason) from e
        finally:
            release_memory()
        record_fit(trial, fit)
        record_note(trial, spec.metric)
        if fit.pruned_at_epoch is not None:
            raise optuna.TrialPruned(f"pruned after epoch {fit.pruned_at_epoch}")
        return objective_value(spec, fit)


class _Reporter:
    """The per-epoch callback of a trial's fit: a safe point to stop at, then (single
    objective only: Optuna cannot prune multi-objective trials) report and ask to prune."""

    def __init__(self, trial: optuna.Trial, check_stop: Callable[[], None], report: bool = True) -> None:
        self.trial = trial
        self.check_stop = check_stop
        self.report = report

    def __call__(self, epoch: int, value: float) -> bool:
        self.check_stop()
        if not self.report or not math.isfinite(value):
            return False
        self.trial.report(value, epoch)
        return self.trial.should_prune()


def objective_value(spec: StudySpec, fit: RepeatFit) -> float | tuple[float, float]:
    """The trial's value under the spec's objective mode."""
    if spec.objective.mode == "pareto":
        return fit.mean, fit.std
    if spec.objective.mode == "mean+k*std":
        sign = 1.0 if spec.direction == "minimize" else -1.0
        return fit.mean + sign * spec.objective.k * fit.std
    return fit.mean


def record_fit(trial: optuna.Trial, fit: RepeatFit) -> None:
    """Store every per-seed figure of the fit as trial user attributes."""
    attrs: dict[str, Any] = {
        ATTR_MEAN: fit.mean,
        ATTR_STD: fit.std,
        ATTR_SEED_SCORES: fit.scores,
        ATTR_SEEDS: [f.seed for f in fit.fits],
        ATTR_BEST_EPOCHS: [f.best_epoch for f in fit.fits],
        ATTR_EPOCHS_RUN: [f.epochs_run for f in fit.fits],
        ATTR_FIT_SECONDS: round(fit.fit_seconds, 4),
        ATTR_CURVES: [f.curves for f in fit.fits],
        ATTR_PATH: fit.path,
    }
    if fit.pruned_at_epoch is not None:
        attrs[ATTR_PRUNED_AT] = fit.pruned_at_epoch
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def record_note(trial: optuna.Trial, metric: str) -> None:
    """Write the trial's optuna-dashboard note (per-seed scores, diagnosis) from what
    `record_fit` stored, so it is there the moment the trial finishes; `hpo dashboard`
    fills in any trial that lacks one (e.g. recorded before notes existed)."""
    write_trial_note(trial.storage, trial.study._study_id, trial._trial_id,
                     trial_note(trial.number, trial.user_attrs, metric))


def write_trial_note(storage: optuna.storages.BaseStorage, study_id: int, trial_id: int, body: str) -> bool:
    """Store `body` as the dashboard note of a trial that has none yet; False when
    optuna-dashboard is not installed.

    optuna-dashboard keeps a note as study system attributes: the body in chunks and a
    version. Its `save_note` reads every attribute of the study to find the version, a
    cost that grows with the study (5,000 notes took minutes); a first note is version 1,
    so it is written directly, body first so no reader sees a version without a body.
    """
    try:
        from optuna_dashboard._note import note_ver_key, split_body
    except ImportError:
        return False
    for key, value in split_body(body, trial_id).items():
        storage.set_study_system_attr(study_id, key, value)
    storage.set_study_system_attr(study_id, note_ver_key(trial_id), 1)
    return True
