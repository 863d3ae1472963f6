"""Studies made by hand through Optuna's API, with hpo's user attributes, so tests know
every stored number (and can store NaN and Infinity the way Python's json writes them)."""

from __future__ import annotations

import math
import statistics

import optuna

from hpo.reports.stats import bootstrap_ci
from hpo.store.storage import get_storage


def curve_record(scores: list[float], val_loss: list[list[float]] | None = None) -> list[dict]:
    if val_loss is None:
        val_loss = [[1.1, 0.6, s] for s in scores]
    return [{"loss": [v + 0.1 for v in vals[:-1]] + [vals[-1]], "val_loss": vals, "metric": [2 * v for v in vals],
             "val_metric": [2 * v + 0.1 for v in vals]} for vals in val_loss]


def add_trial(study: optuna.Study, params: dict, scores: list[float], *, best_epochs: list[int] | None = None,
              curves: list[dict] | None = None, distributions: dict | None = None,
              stored_ci: bool = True, pruned_at: int | None = None) -> optuna.trial.FrozenTrial:
    """One finished trial with the given params, per-seed scores and curves; its value is
    the mean of the scores (NaN if any is not finite, which Optuna records as a failure).
    Without `stored_ci` it has no `ci_low`/`ci_high`, as trials recorded before hpo stored them.
    With `pruned_at` it was pruned after that epoch, its pruner reports all above its mean."""
    best_epochs = best_epochs or [3] * len(scores)
    distributions = distributions or {
        "act": optuna.distributions.CategoricalDistribution(["relu", "tanh"]),
        "units": optuna.distributions.IntDistribution(16, 64),
        "lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
    }
    finite = all(math.isfinite(s) for s in scores)
    mean = statistics.fmean(scores) if finite else float("nan")
    std = statistics.stdev(scores) if finite and len(scores) > 1 else (0.0 if finite else float("nan"))
    attrs = {"seeds": list(range(10, 10 + len(scores))), "seed_scores": scores, "mean": mean, "std": std,
             "best_epochs": best_epochs, "epochs_run": [b + 2 for b in best_epochs],
             "curves": curves if curves is not None else curve_record(scores)}
    if stored_ci:
        attrs["ci_low"], attrs["ci_high"] = bootstrap_ci(scores)
    state = optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL
    steps = None
    if pruned_at is not None:
        attrs["pruned_at_epoch"] = pruned_at
        state, steps = optuna.trial.TrialState.PRUNED, {e: mean + 1.0 for e in range(1, pruned_at + 1)}
    trial = optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params},
                                      value=mean if state == optuna.trial.TrialState.COMPLETE else None,
                                      user_attrs=attrs, state=state, intermediate_values=steps)
    study.add_trial(trial)
    return study.get_trials()[-1]


def make_study(url: str, name: str = "hand", direction: str = "minimize") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(study_name=name, storage=get_storage(url), direction=direction)


def close(study: optuna.Study) -> None:
    """Close the study's connections, so SQLite folds its WAL file into the database file
    (tests that copy or hash the file need it whole)."""
    study._storage._backend.engine.dispose()
