"""The Optuna objective: a trial in; suggested params, repeated seeded fits, pruning
reports and the per-seed record out, with the mean (or mean and std) as its value.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from hpo.errors import StorageError, TrialFailed
from hpo.record import (ATTR_ADDED_FAIL_REASON, ATTR_ADDED_SCORES, ATTR_ADDED_SEEDS, ATTR_BACKEND, ATTR_BEST_EPOCHS,
                        ATTR_CI_HIGH, ATTR_CI_LOW, ATTR_COMPILE_SECONDS, ATTR_CURVES, ATTR_EPOCHS_RUN, ATTR_FAIL_REASON,
                        ATTR_FIT_SECONDS, ATTR_MEAN, ATTR_PATH, ATTR_PREPARED_SECONDS, ATTR_PRUNED_AT, ATTR_SEEDS,
                        ATTR_SEED_SCORES, ATTR_SEED_STOP, ATTR_STD, ATTR_UNDECIDED_AGAINST)
from hpo.reports.dashboard import write_trial_note
from hpo.reports.diagnosis import trial_note
from hpo.reports.stats import bootstrap_ci, welch
from hpo.spec import StudySpec
from hpo.spec.space import suggest_params
from hpo.train.fit import RepeatFit, fit_repeats, release_memory
from hpo.words import plural

# Adaptive seeds: a challenger stops adding seeds once Welch's test at this level tells it
# from the incumbent (either way).
RACE_ALPHA = 0.05


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
        on_epoch = _Reporter(trial, spec, self.check_stop, report=not spec.is_multi_objective)
        try:
            # Inside the try: a fault while suggesting fails this trial, not the worker.
            params = suggest_params(spec, trial)
            fit = fit_repeats(spec, params, seeds, on_epoch)
            if spec.seeds_max is not None and fit.pruned_at_epoch is None:
                fit = self._race(trial, params, fit)
        except TrialFailed as e:
            trial.set_user_attr(ATTR_FAIL_REASON, str(e))
            raise
        except StorageError:
            # The database failed, not the trial: the worker gives the trial back.
            raise
        except Exception as e:  # noqa: BLE001 - any fault in user-shaped code fails this trial only
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr(ATTR_FAIL_REASON, reason[:2000])
            raise TrialFailed(reason) from e
        finally:
            release_memory()
            if isinstance(on_epoch, _Reporter):
                on_epoch.close()
        record_fit(trial, fit)
        record_note(trial, spec.metric)
        if fit.pruned_at_epoch is not None:
            raise optuna.TrialPruned(f"pruned after epoch {fit.pruned_at_epoch}")
        return objective_value(spec, fit)


    def _race(self, trial: optuna.Trial, params: dict[str, Any], fit: RepeatFit) -> RepeatFit:
        """Adaptive seeds: add batches of `seeds` new seeds (trained together, continuing the
        trial's sequence) while Welch's test cannot tell the trial from the incumbent, up
        to `seeds_max`. Only the first batch reports to the pruner: later batches would
        report epochs Optuna has already seen. Stores why it stopped in `seed_stop_reason`,
        and the incumbent's number in `undecided_against` when it came close: undecided
        at `seeds_max`, so the worker gives the incumbent more seeds next."""
        spec = self.spec
        while True:
            incumbent = _incumbent(trial)
            if incumbent is None:
                reason = "no complete trial to race yet"
                break
            number, best = incumbent
            against = f"incumbent #{number} on {plural(len(best), 'seed')}"
            if len(best) < 2 or len(fit.fits) < 2:
                reason = f"{against}: too few seeds to test against"
                break
            if len(set(best)) == 1 and len(set(fit.scores)) == 1:
                reason = f"constant scores, told apart from {against} exactly"
                break
            _, p = welch(fit.scores, best)
            if p < RACE_ALPHA:
                better = (fit.mean < statistics.fmean(best)) == (spec.direction == "minimize")
                reason = f"{'better' if better else 'worse'} than {against} (Welch p = {p:.2g})"
                break
            if len(fit.fits) >= spec.seeds_max:
                reason = f"reached seeds max = {spec.seeds_max}, undecided against {against} (Welch p = {p:.2g})"
                trial.set_user_attr(ATTR_UNDECIDED_AGAINST, number)
                break
            start = spec.seed * 1000 + len(fit.fits)
            batch = [start + i for i in range(min(spec.seeds, spec.seeds_max - len(fit.fits)))]
            # Later batches stop at a signal like the first, but do not report to the pruner.
            more = fit_repeats(spec, params, batch, lambda epoch, scores: self.check_stop() or False)
            compiled = None if fit.compile_seconds is None else fit.compile_seconds + (more.compile_seconds or 0.0)
            fit = RepeatFit(fit.fits + more.fits, fit.fit_seconds + more.fit_seconds, fit.path, backend=fit.backend,
                            compile_seconds=compiled, prepared_seconds=fit.prepared_seconds)
        trial.set_user_attr(ATTR_SEED_STOP, reason)
        return fit


def _incumbent(trial: optuna.Trial) -> tuple[int, list[float]] | None:
    """The study's best complete trial so far and the finite scores of every seed it has
    now (those it was selected on and any added since), or None."""
    try:
        best = trial.study.best_trial
    except ValueError:
        return None
    record = read_seed_record(trial.storage, best._trial_id)
    return best.number, [s for s in record.all_scores if s is not None and math.isfinite(s)]


@dataclass
class SeedRecord:
    """The seeds a finished trial was fitted on, as the database holds them now: those it
    was selected on, then those added while it was the incumbent."""

    seeds: list[int]
    scores: list[float]
    added_seeds: list[int]
    added_scores: list[float]
    added_fail_reason: str | None = None

    @property
    def all_seeds(self) -> list[int]:
        return self.seeds + self.added_seeds

    @property
    def all_scores(self) -> list[float]:
        return self.scores + self.added_scores


def read_seed_record(storage: optuna.storages.BaseStorage, trial_id: int) -> SeedRecord:
    """A trial's seeds and scores read from the database itself.

    Optuna's cache (`_CachedStorage`, under every study) keeps a finished trial as it first
    saw it, and seeds are added to an incumbent after it finished, by this worker or
    another: so the read goes to the `RDBStorage` under the cache.
    """
    attrs = getattr(storage, "_backend", storage).get_trial_user_attrs(trial_id)
    return SeedRecord(list(attrs.get(ATTR_SEEDS) or []), list(attrs.get(ATTR_SEED_SCORES) or []),
                      list(attrs.get(ATTR_ADDED_SEEDS) or []), list(attrs.get(ATTR_ADDED_SCORES) or []),
                      attrs.get(ATTR_ADDED_FAIL_REASON))


class _Reporter:
    """The per-epoch callback of a trial's fit: a safe point to stop at (the worker's
    `check_stop`), then (single objective only: Optuna cannot prune multi-objective trials)
    report the value the trial would get if it stopped now, at step = the epoch, and ask
    to prune. That value is the objective's own (`trial_value`) over each seed's best
    score so far, so the pruner judges the number the trial is scored by and the last
    report equals the trial's value. When stdout is a terminal a live line shows it."""

    def __init__(self, trial: optuna.Trial, spec: StudySpec, check_stop: Callable[[], None],
                 report: bool = True) -> None:
        self.trial = trial
        self.spec = spec
        self.check_stop = check_stop
        self.report = report
        self.line = _ProgressLine(trial.number, spec.training.max_epochs) if sys.stdout.isatty() else None

    def __call__(self, epoch: int, scores: list[float]) -> bool:
        self.check_stop()
        value = trial_value(self.spec, scores)
        value = value[0] if isinstance(value, tuple) else value
        if self.line is not None:
            self.line.update(epoch, f"value so far {value:.5g}")
        if not self.report or not math.isfinite(value):
            return False
        self.trial.report(value, epoch)
        return self.trial.should_prune()

    def close(self) -> None:
        if self.line is not None:
            self.line.close()


class _ProgressLine:
    """A trial's live line on a terminal. The first epoch also pays for building the model
    and compiling it, many times an epoch's cost, so it is its own step: the line shows
    that start-up apart and the time per epoch from the second epoch on."""

    def __init__(self, number: int, max_epochs: int, clock: Callable[[], float] = time.perf_counter) -> None:
        from tqdm import tqdm

        self.clock = clock
        self.started = clock()
        self.first_done: float | None = None
        self.bar = tqdm(total=max_epochs, desc=f"trial {number}", leave=False, dynamic_ncols=True, file=sys.stdout,
                        bar_format="{desc}: {bar} {n_fmt}/{total_fmt} epochs [{elapsed}] {postfix}")
        self.bar.set_postfix_str("building and compiling the model, then epoch 1", refresh=True)

    def update(self, epoch: int, text: str) -> None:
        now = self.clock()
        if self.first_done is None:
            self.first_done = now
        self.bar.update(epoch - self.bar.n)
        self.bar.set_postfix_str(f"{progress_timing(self.first_done - self.started, now - self.first_done, epoch - 1)}"
                                 f" | {text}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def progress_timing(first: float, later: float, later_epochs: int) -> str:
    """The live line's timing: `first` seconds to the end of epoch 1 (start-up, compiling
    and the epoch itself), `later` seconds for the `later_epochs` epochs after it."""
    if later_epochs < 1:
        return f"start-up, compiling and epoch 1 {first:.1f}s"
    per_epoch = later / later_epochs
    return f"start-up and compiling {max(0.0, first - per_epoch):.1f}s, then {per_epoch:.3g}s/epoch"


def trial_value(spec: StudySpec, scores: list[float]) -> float | tuple[float, float]:
    """The objective's value of per-seed scores under the spec's objective mode: their
    mean, mean + k*std (std toward the worse side), or (mean, std) for "pareto"."""
    mean = float(statistics.fmean(scores))
    std = float(statistics.stdev(scores)) if len(scores) > 1 else 0.0
    if spec.objective.mode == "pareto":
        return mean, std
    if spec.objective.mode == "mean+k*std":
        sign = 1.0 if spec.direction == "minimize" else -1.0
        return mean + sign * spec.objective.k * std
    return mean


def objective_value(spec: StudySpec, fit: RepeatFit) -> float | tuple[float, float]:
    """The trial's value under the spec's objective mode."""
    return trial_value(spec, fit.scores)


def record_fit(trial: optuna.Trial, fit: RepeatFit) -> None:
    """Store every per-seed figure of the fit as trial user attributes, with the bootstrap
    interval of their mean (the `hpo_trials` view's `ci_low`/`ci_high`, as `hpo report`
    prints it: SQL cannot resample)."""
    ci_low, ci_high = bootstrap_ci(fit.scores)
    attrs: dict[str, Any] = {
        ATTR_MEAN: fit.mean,
        ATTR_STD: fit.std,
        ATTR_CI_LOW: ci_low,
        ATTR_CI_HIGH: ci_high,
        ATTR_SEED_SCORES: fit.scores,
        ATTR_SEEDS: [f.seed for f in fit.fits],
        ATTR_BEST_EPOCHS: [f.best_epoch for f in fit.fits],
        ATTR_EPOCHS_RUN: [f.epochs_run for f in fit.fits],
        ATTR_FIT_SECONDS: round(fit.fit_seconds, 4),
        ATTR_CURVES: [f.curves for f in fit.fits],
        ATTR_PATH: fit.path,
    }
    if fit.backend is not None:
        attrs[ATTR_BACKEND] = fit.backend
    if fit.compile_seconds is not None:
        attrs[ATTR_COMPILE_SECONDS] = round(fit.compile_seconds, 4)
    if fit.prepared_seconds is not None:
        attrs[ATTR_PREPARED_SECONDS] = round(fit.prepared_seconds, 4)
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
