"""Confirmation: finished trials in; the same trials refitted on seeds they were not
selected on out, stored on each trial.

`confirm_study`: at the end of a study (or `hpo confirm`), its top trials on fresh
  seeds (`confirm_seeds`, `confirm_scores`, `confirm_mean`, `confirm_std`). The winner is
  the maximum of many noisy means, so its selection-time mean is biased in its favour;
  the confirmed mean is not.

Workers share the work like trials: each piece is claimed (a study system attribute set
under the study's admission lock) before it is fitted, so none is fitted twice.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError
from hpo.record import (ATTR_ADDED_SEEDS, ATTR_CONFIRM_MEAN, ATTR_CONFIRM_SCORES, ATTR_CONFIRM_SEEDS, ATTR_CONFIRM_STD,
                        ATTR_SEEDS, ATTR_SEED_SCORES)
from hpo.reports.dashboard import write_trial_note
from hpo.reports.diagnosis import trial_note
from hpo.specs import StudySpec
from hpo.specs.space import suggest_params
from hpo.store.storage import claim_work, count_trials, rdb_storage, write_trial_user_attrs
from hpo.words import mean_std, plural

CLAIM_PREFIX = "hpo:confirm:"
POLL_SECONDS = 1.0


@dataclass
class Confirmed:
    number: int
    seeds: list[int]
    scores: list[float]
    mean: float
    std: float


def top_trials(study: optuna.Study, spec: StudySpec, top: int) -> list[FrozenTrial]:
    """The `top` complete trials, best first (Pareto studies: by mean)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and ATTR_SEED_SCORES in t.user_attrs]
    sign = 1.0 if spec.direction == "minimize" else -1.0
    return sorted(done, key=lambda t: (sign * t.values[0], t.number))[:top]


def fresh_seeds(study: optuna.Study, spec: StudySpec, n: int) -> list[int]:
    """`n` seeds continuing the study's seed sequence past every seed any trial used."""
    used = [s for t in study.get_trials(deepcopy=False)
            for s in (t.user_attrs.get(ATTR_SEEDS) or []) + (t.user_attrs.get(ATTR_ADDED_SEEDS) or [])]
    start = max([spec.seed * 1000 + (spec.seeds_max or spec.seeds) - 1, *used]) + 1
    return [start + i for i in range(n)]


def confirm_study(study: optuna.Study, spec: StudySpec, top: int, seeds: int,
                  echo: Callable[[str], None] = print, wait: bool = True) -> list[Confirmed]:
    """Refit the study's `top` trials on `seeds` fresh seeds each; what this process refitted.

    Trials confirmed already (or claimed by a live worker) are left alone. With `wait`,
    it first waits for running trials to finish, so every worker ranks the same trials.
    """
    from hpo.train.fit import fit_repeats, release_memory

    storage = rdb_storage(study._storage)
    while wait and count_trials(storage, study._study_id).running:
        time.sleep(POLL_SECONDS)
    trials = top_trials(study, spec, top)
    if not trials:
        counts = count_trials(storage, study._study_id)
        raise HpoError(f'study "{study.study_name}" has no complete trial to confirm ({counts.pruned} pruned, '
                       f"{counts.failed} failed); run trials first (hpo run, or hpo worker --study-name "
                       f"{study.study_name}) until one completes")
    new_seeds = fresh_seeds(study, spec, seeds)
    done: list[Confirmed] = []
    for trial in trials:
        if not claim_work(storage, study._study_id, f"{CLAIM_PREFIX}{trial._trial_id}",
                          done=lambda: ATTR_CONFIRM_MEAN in storage.get_trial_user_attrs(trial._trial_id)):
            continue
        params = suggest_params(spec, optuna.trial.FixedTrial(trial.params, number=trial.number))
        try:
            fit = fit_repeats(spec, params, new_seeds, None)
        finally:
            release_memory()
        scores = fit.scores
        result = Confirmed(trial.number, new_seeds, scores, statistics.fmean(scores),
                           statistics.stdev(scores) if len(scores) > 1 else 0.0)
        confirmed = {ATTR_CONFIRM_SEEDS: result.seeds, ATTR_CONFIRM_SCORES: result.scores,
                     ATTR_CONFIRM_STD: result.std, ATTR_CONFIRM_MEAN: result.mean}
        write_trial_user_attrs(storage, trial._trial_id, confirmed)
        # The dashboard shows the note, so the note shows the confirmation.
        attrs = {**storage.get_trial_user_attrs(trial._trial_id), **confirmed}
        write_trial_note(storage, study._study_id, trial._trial_id, trial_note(trial.number, attrs, spec.metric),
                         replace=True)
        echo(f"confirmed trial {trial.number}: {spec.metric} {mean_std(result.mean, result.std, len(new_seeds))} on "
             f"{plural(len(new_seeds), 'fresh seed')} (selected at {trial.user_attrs.get('mean', float('nan')):.5g})")
        done.append(result)
    return done
