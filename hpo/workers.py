"""Workers: a study and a budget in, trials run until the budget or the clock is spent out,
with a line of progress per finished trial.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import TrialFailed
from hpo.objective import ATTR_FAIL_REASON, ATTR_PRUNED_AT, Objective
from hpo.spec import StudySpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class RunSummary:
    """What a run did, for the closing lines of `hpo run`."""

    study_name: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped_reason: str = ""
    best: FrozenTrial | None = None
    lines: list[str] = field(default_factory=list)


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_trials(study: optuna.Study, spec: StudySpec, *, budget: int, timeout: float | None = None,
               max_consecutive_failures: int = 5, echo: Callable[[str], None] = print) -> RunSummary:
    """Run trials until the study holds `budget` finished (complete or pruned) trials.

    Args:
        study: The study, with the spec's sampler and pruner.
        spec: Its spec.
        budget: Finished trials the whole study should end with.
        timeout: Stop starting trials after this many seconds.
        max_consecutive_failures: Stop after this many failed trials in a row.
        echo: Where progress lines go.
    """
    _quiet_optuna()
    summary = RunSummary(spec.name)
    start = time.perf_counter()
    failures_in_a_row = 0

    def progress(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal failures_in_a_row
        if trial.state == TrialState.COMPLETE:
            summary.complete += 1
            failures_in_a_row = 0
        elif trial.state == TrialState.PRUNED:
            summary.pruned += 1
            failures_in_a_row = 0
        elif trial.state == TrialState.FAIL:
            summary.failed += 1
            failures_in_a_row += 1
        echo(describe_trial(spec, trial, study))
        if count_finished(study) >= budget:
            study.stop()
        elif failures_in_a_row >= max_consecutive_failures:
            summary.stopped_reason = (f"stopped after {failures_in_a_row} failed trials in a row; "
                                      f"last reason: {trial.user_attrs.get(ATTR_FAIL_REASON, 'unknown')}")
            study.stop()

    if count_finished(study) < budget:
        study.optimize(Objective(spec), timeout=timeout, callbacks=[progress], catch=(TrialFailed,),
                       gc_after_trial=False)
    summary.seconds = time.perf_counter() - start
    summary.best = best_trial(study, spec)
    return summary


def best_trial(study: optuna.Study, spec: StudySpec) -> FrozenTrial | None:
    """The best complete trial (for Pareto studies: the lowest-mean trial of the front)."""
    if spec.is_multi_objective:
        front = study.best_trials
        if not front:
            return None
        pick = min if spec.direction == "minimize" else max
        return pick(front, key=lambda t: t.values[0])
    try:
        return study.best_trial
    except ValueError:
        return None


def describe_trial(spec: StudySpec, trial: FrozenTrial, study: optuna.Study | None = None) -> str:
    """One progress line for a finished trial."""
    state = trial.state.name.lower()
    attrs = trial.user_attrs
    head = f"trial {trial.number:>4} {state:<8}"
    if "mean" in attrs:
        n = len(attrs.get("seed_scores", []))
        head += (f" {spec.metric} {attrs['mean']:.5g} ± {attrs['std']:.2g} "
                 f"({n} seeds, {attrs.get('training_path', '?')}, {attrs.get('fit_seconds', 0):.1f} s)")
        if trial.state == TrialState.PRUNED and ATTR_PRUNED_AT in attrs:
            head += f" pruned at epoch {attrs[ATTR_PRUNED_AT]}"
    elif trial.state == TrialState.FAIL:
        head += f" {attrs.get(ATTR_FAIL_REASON, 'no reason stored')}"
    if study is not None:
        trials = study.get_trials(deepcopy=False)
        counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        best = best_trial(study, spec)
        if best is not None and "mean" in best.user_attrs:
            head += f" | best #{best.number} {best.user_attrs['mean']:.5g} ± {best.user_attrs['std']:.2g}"
        head += (f" | {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                 f"{counts[TrialState.FAIL]} failed")
    return head


def _quiet_optuna() -> None:
    # Optuna logs every caught trial failure with a traceback; our progress line says why.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

