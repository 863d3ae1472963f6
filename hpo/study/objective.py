"""The Optuna objective: a trial in; suggested params, repeated seeded fits, pruning
reports and the per-seed record out, with the mean (or mean and std) as its value.
"""

from __future__ import annotations

import collections
import math
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import optuna

from hpo.errors import StorageError, TrialFailed
from hpo.record import (ATTR_BACKEND, ATTR_BEST_EPOCHS, ATTR_CI_HIGH, ATTR_CI_LOW, ATTR_COMPILE_SECONDS, ATTR_CURVES,
                        ATTR_EPOCHS_RUN, ATTR_FAIL_REASON, ATTR_FIT_SECONDS, ATTR_MEAN, ATTR_PATH,
                        ATTR_PREPARED_SECONDS, ATTR_PRUNED_AT, ATTR_SEEDS, ATTR_SEED_SCORES, ATTR_STD)
from hpo.reports.dashboard import write_trial_note
from hpo.reports.diagnosis import trial_note
from hpo.reports.stats import bootstrap_ci
from hpo.specs import StudySpec
from hpo.specs.space import suggest_params
from hpo.store.storage import rdb_storage, write_trial_user_attrs
from hpo.study.race import race
from hpo.train.fit import RepeatFit, fit_repeats, release_memory


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
            on_epoch.flush()  # its reports are in the database before anything reads them
            if spec.seeds_max is not None and fit.pruned_at_epoch is None:
                fit = race(spec, trial, params, fit, self.check_stop)
        except TrialFailed as e:
            trial.set_user_attr(ATTR_FAIL_REASON, str(e))
            raise
        except (StorageError, optuna.exceptions.UpdateFinishedTrialError):
            # The database failed, not the trial (the worker gives the trial back), or another
            # worker took this one for dead while the database was away (its copy will run).
            raise
        except Exception as e:  # noqa: BLE001 - any fault in user-shaped code fails this trial only
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr(ATTR_FAIL_REASON, reason[:2000])
            raise TrialFailed(reason) from e
        finally:
            release_memory()
            on_epoch.close()
        record_note(trial, spec.metric, record_fit(trial, fit))
        if fit.pruned_at_epoch is not None:
            raise optuna.TrialPruned(f"pruned after epoch {fit.pruned_at_epoch}")
        return objective_value(spec, fit)


class _Reporter:
    """The per-epoch callback of a trial's fit: a safe point to stop at (the worker's
    `check_stop`), then (single objective only: Optuna cannot prune multi-objective trials)
    report the value the trial would get if it stopped now, at step = the epoch, and ask
    to prune. That value is the objective's own (`trial_value`) over each seed's best
    score so far, so the pruner judges the number the trial is scored by and the last
    report equals the trial's value. When stdout is a terminal a live line shows it.

    Where the pruner decides from this process's reports alone (a percentile or median
    pruner, which also reads the complete trials, or none), the reports are written by a
    thread of their own, in order, while the next epoch trains: each is a database
    transaction (4-5 ms on SQLite, a round trip or more on a server). A report that fails
    (the database away past its retries) raises at the next epoch, or at `flush`, which
    the trial calls before anything reads its reports back. Any other pruner (Hyperband,
    successive halving, threshold, patience, Wilcoxon) reads its trial as Optuna keeps
    it, so reports are written before it asks."""

    def __init__(self, trial: optuna.Trial, spec: StudySpec, check_stop: Callable[[], None],
                 report: bool = True) -> None:
        self.trial = trial
        self.spec = spec
        self.check_stop = check_stop
        self.report = report
        self.line = _ProgressLine(trial.number, spec.training.max_epochs) if sys.stdout.isatty() else None
        pruner = trial.study.pruner
        self.complete = _CompleteTrials(trial.study) if isinstance(pruner, optuna.pruners.PercentilePruner) else None
        self.frozen: optuna.trial.FrozenTrial | None = None  # this trial as its pruner reads it, kept here
        self.writer: ThreadPoolExecutor | None = None
        self.written: collections.deque[Future] = collections.deque()
        self.failed = False
        if self.complete is not None or isinstance(pruner, optuna.pruners.NopPruner):
            self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hpo-report-{trial.number}")

    def __call__(self, epoch: int, scores: list[float]) -> bool:
        self.check_stop()
        value = trial_value(self.spec, scores)
        value = value[0] if isinstance(value, tuple) else value
        if self.line is not None:
            self.line.update(epoch, f"value so far {value:.5g}")
        if not self.report or not math.isfinite(value):
            return False
        if self.writer is None:
            self.trial.report(value, epoch)
            return self.trial.should_prune()
        self._raise_failed(wait=False)
        study = self.trial.study
        if self.complete is not None and self.frozen is None:
            # Read once, before the first report: the pruner reads only the reports, this process's.
            self.frozen = study._storage.get_trial(self.trial._trial_id)
        self.written.append(self.writer.submit(self._write, value, epoch))
        if self.complete is None:
            return False
        self.frozen.intermediate_values[epoch] = value
        return study.pruner.prune(self.complete, self.frozen)

    def _write(self, value: float, epoch: int) -> None:
        if self.failed:  # no gap in the curve: once one fails, the later ones are not written
            return
        try:
            self.trial.report(value, epoch)
        except BaseException:
            self.failed = True
            raise

    def _raise_failed(self, wait: bool) -> None:
        while self.written and (wait or self.written[0].done()):
            self.written.popleft().result()

    def flush(self) -> None:
        """Wait for the reports written so far; raise the first that failed."""
        self._raise_failed(wait=True)

    def close(self) -> None:
        """Wait for the reports (a trial that raised has its own error to tell) and end
        the live line."""
        if self.writer is not None:
            self.writer.shutdown(wait=True)
        if self.line is not None:
            self.line.close()


class _CompleteTrials:
    """The study as a percentile pruner (Optuna's `PercentilePruner`, `MedianPruner`) reads
    it, for one trial's epochs: its complete trials, read on the first epoch and again
    once `COMPLETE_READ_SECONDS` have passed; anything else is the study's own.

    Optuna's `should_prune` reads every unfinished trial of the study (with all its
    reports) from the database at each epoch to find the complete ones: 9 ms an epoch on
    SQLite with one worker, and one more running trial to read for each other worker.
    With one worker no trial completes while this one runs, so its pruning is Optuna's to
    the decision; with several, a trial another worker completes meanwhile counts from the
    next read on."""

    COMPLETE_READ_SECONDS = 10.0

    def __init__(self, study: optuna.Study, clock: Callable[[], float] = time.monotonic) -> None:
        self.study = study
        self.clock = clock
        self.read_at = -math.inf
        self.trials: list[optuna.trial.FrozenTrial] = []

    def get_trials(self, deepcopy: bool = True,
                   states: Any = None) -> list[optuna.trial.FrozenTrial]:
        complete = (optuna.trial.TrialState.COMPLETE,)
        if deepcopy or tuple(states or ()) != complete:
            return self.study.get_trials(deepcopy=deepcopy, states=states)
        if self.clock() - self.read_at > self.COMPLETE_READ_SECONDS:
            self.trials = self.study.get_trials(deepcopy=False, states=complete)
            self.read_at = self.clock()
        return self.trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self.study, name)


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


def record_fit(trial: optuna.Trial, fit: RepeatFit) -> dict[str, Any]:
    """Store every per-seed figure of the fit as trial user attributes, with the bootstrap
    interval of their mean (the `hpo_trials` view's `ci_low`/`ci_high`, as `hpo report`
    prints it: SQL cannot resample); returns them. In one transaction, not a dozen: each
    is a round trip to a remote database or a storage proxy. `trial.user_attrs` does not
    show them (read the stored trial)."""
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
    write_trial_user_attrs(rdb_storage(trial.storage), trial._trial_id, attrs, running_only=True)
    return attrs


def record_note(trial: optuna.Trial, metric: str, recorded: dict[str, Any]) -> None:
    """Write the trial's optuna-dashboard note (per-seed scores, diagnosis) from what
    `record_fit` stored (`recorded`), so it is there the moment the trial finishes; `hpo
    dashboard` fills in any trial that lacks one (e.g. recorded before notes existed)."""
    write_trial_note(trial.storage, trial.study._study_id, trial._trial_id,
                     trial_note(trial.number, {**trial.user_attrs, **recorded}, metric))
