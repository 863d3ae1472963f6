"""Adaptive seeds (`seeds = { min, max }`): a trial's first seeds in; more seeds out, where
the seeds cannot yet tell a challenger from the incumbent.

- `race`: a challenger adds batches of seeds (continuing its own sequence) while Welch's
  test cannot tell it from the incumbent, up to `seeds_max`.
- `add_incumbent_seeds` (the worker's call, which says what happened) and
  `fit_incumbent_seeds` (the fit): when a challenger's race ends undecided, the incumbent
  gains a batch of seeds (`incumbent_seeds`, `incumbent_scores`, ...), so later races test
  against a sharper incumbent. Workers claim the batch first (a study system attribute set
  under the admission lock), so no two fit it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from hpo.errors import TrialFailed
from hpo.record import (ATTR_ADDED_BEST_EPOCHS, ATTR_ADDED_CURVES, ATTR_ADDED_EPOCHS_RUN, ATTR_ADDED_FAIL_REASON,
                        ATTR_ADDED_SCORES, ATTR_ADDED_SEEDS, ATTR_ALL_MEAN, ATTR_ALL_STD, ATTR_CI_HIGH, ATTR_CI_LOW,
                        ATTR_SEEDS, ATTR_SEED_SCORES, ATTR_SEED_STOP, ATTR_UNDECIDED_AGAINST)
from hpo.reports.dashboard import write_trial_note
from hpo.reports.diagnosis import trial_note
from hpo.reports.stats import bootstrap_ci, welch
from hpo.specs import StudySpec
from hpo.specs.space import suggest_params
from hpo.store.storage import claim_work, rdb_storage, release_claim, write_trial_user_attrs
from hpo.train.fit import RepeatFit
from hpo.words import mean_std, plural

INCUMBENT_CLAIM_PREFIX = "hpo:incumbent:"

# Adaptive seeds: a challenger stops adding seeds once Welch's test at this level tells it
# from the incumbent (either way).
RACE_ALPHA = 0.05


def race(spec: StudySpec, trial: optuna.Trial, params: dict[str, Any], fit: RepeatFit,
         check_stop: Callable[[], None]) -> RepeatFit:
    """Adaptive seeds: add batches of `seeds` new seeds (trained together, continuing the
    trial's sequence) while Welch's test cannot tell the trial from the incumbent, up
    to `seeds_max`. Only the first batch reports to the pruner: later batches would
    report epochs Optuna has already seen. Stores why it stopped in `seed_stop_reason`,
    and the incumbent's number in `undecided_against` when it came close: undecided
    at `seeds_max`, so the worker gives the incumbent more seeds next
    (`add_incumbent_seeds`)."""
    from hpo.train.fit import fit_repeats

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
        more = fit_repeats(spec, params, batch, lambda epoch, scores: check_stop() or False)
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


def add_incumbent_seeds(study: optuna.Study, spec: StudySpec, number: int, check_stop: Callable[[], None],
                        echo: Callable[[str], None]) -> None:
    """After a challenger's race ended undecided against incumbent `number`: give the
    incumbent a batch of new seeds (`fit_incumbent_seeds`) and say what it gained; a
    failed fit is said, and the worker goes on."""
    try:
        added = fit_incumbent_seeds(study, spec, number, check_stop)
    except TrialFailed as e:
        echo(f"a challenger came close to incumbent #{number}, but adding it seeds failed: {e}")
        return
    if added is not None:
        echo(f"a challenger came close to incumbent #{number}: it gained seeds {added.seeds}; {spec.metric} "
             f"{mean_std(added.mean, added.std, added.n_seeds)} over its {plural(added.n_seeds, 'seed')}")


@dataclass
class AddedSeeds:
    """Seeds an incumbent gained, and its figures over every seed it has now."""

    number: int
    seeds: list[int]
    scores: list[float]
    n_seeds: int
    mean: float
    std: float


def fit_incumbent_seeds(study: optuna.Study, spec: StudySpec, number: int,
                        check_stop: Callable[[], None] = lambda: None) -> AddedSeeds | None:
    """Fit trial `number` (an incumbent a challenger came close to) a batch of `seeds` new
    seeds and add them to its record; None when another worker is adding some now, the
    trial has `seeds_max` seeds already, or adding failed before.

    The seeds continue the trial's own sequence (`seed*1000 + i`), so they stay below the
    seeds confirmation takes. Optuna's value, `mean`, `std` and `seed_scores` stay what the
    trial was selected on; `incumbent_*` hold the added seeds, `all_seeds_mean` and
    `all_seeds_std` the figures over both, and `ci_low`/`ci_high` are recomputed over both.

    Raises:
        TrialFailed: A new seed diverged or its fit raised; the reason is stored on the
            trial (`incumbent_fail_reason`) and no worker tries again.
    """
    from hpo.train.fit import fit_repeats, release_memory

    if spec.seeds_max is None:
        return None
    storage = rdb_storage(study._storage)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    key = f"{INCUMBENT_CLAIM_PREFIX}{trial_id}"

    def done() -> bool:
        record = read_seed_record(storage, trial_id)
        return record.added_fail_reason is not None or len(record.all_scores) >= spec.seeds_max

    if not claim_work(storage, study._study_id, key, done=done):
        return None
    try:
        record = read_seed_record(storage, trial_id)
        start = max(record.all_seeds) + 1
        batch = [start + i for i in range(min(spec.seeds, spec.seeds_max - len(record.all_scores)))]
        params = suggest_params(spec, optuna.trial.FixedTrial(storage.get_trial(trial_id).params, number=number))
        try:
            fit = fit_repeats(spec, params, batch, lambda epoch, scores: check_stop() or False)
        except Exception as e:  # noqa: BLE001 - as in a trial: a fault in user-shaped code fails this fit only
            reason = str(e) if isinstance(e, TrialFailed) else f"{type(e).__name__}: {e}"[:2000]
            write_trial_user_attrs(storage, trial_id, {ATTR_ADDED_FAIL_REASON: reason})
            raise TrialFailed(reason) from e
        finally:
            release_memory()
        attrs = storage.get_trial_user_attrs(trial_id)
        added = {k: list(attrs.get(k) or []) + new for k, new in (
            (ATTR_ADDED_SEEDS, [f.seed for f in fit.fits]), (ATTR_ADDED_SCORES, fit.scores),
            (ATTR_ADDED_BEST_EPOCHS, [f.best_epoch for f in fit.fits]),
            (ATTR_ADDED_EPOCHS_RUN, [f.epochs_run for f in fit.fits]), (ATTR_ADDED_CURVES, [f.curves for f in fit.fits]))}
        scores = record.scores + added[ATTR_ADDED_SCORES]
        ci_low, ci_high = bootstrap_ci(scores)
        added.update({ATTR_ALL_MEAN: statistics.fmean(scores), ATTR_ALL_STD: statistics.stdev(scores),
                      ATTR_CI_LOW: ci_low, ATTR_CI_HIGH: ci_high})
        write_trial_user_attrs(storage, trial_id, added)
        write_trial_note(storage, study._study_id, trial_id, trial_note(number, {**attrs, **added}, spec.metric),
                         replace=True)
    finally:
        release_claim(storage, study._study_id, key)
    return AddedSeeds(number, batch, fit.scores, len(scores), added[ATTR_ALL_MEAN], added[ATTR_ALL_STD])
