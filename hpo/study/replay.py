"""Replay: a stored trial in; its params refitted with the same seeds, and stored versus
replayed per-seed scores out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from hpo.errors import StudyNotFound
from hpo.record import ATTR_BACKEND, ATTR_PRUNED_AT, ATTR_SEEDS, ATTR_SEED_SCORES
from hpo.specs.space import suggest_params
from hpo.store.storage import get_storage
from hpo.store.urls import existing_sqlite_path, resolve_storage_url
from hpo.study.study import load_study
from hpo.train.fit import fit_repeats, release_memory


@dataclass
class ReplayResult:
    # The trial's searched params as stored (what the run summary prints), not every
    # name the model was built with.
    params: dict[str, Any]
    seeds: list[int]
    stored: list[float]
    replayed: list[float]

    @property
    def identical(self) -> bool:
        return self.stored == self.replayed


def replay_trial(storage_url: str, study_name: str, number: int) -> ReplayResult:
    """Refit trial `number` of the study with its stored params and seeds.

    A pruned trial is replayed up to the epoch it was pruned at.

    Raises:
        StudyNotFound: No such study, or no such trial with stored scores.
    """
    storage_url = resolve_storage_url(storage_url)
    existing_sqlite_path(storage_url)  # a read creates no empty database
    study, spec = load_study(get_storage(storage_url, command="replay"), study_name)
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials or ATTR_SEED_SCORES not in trials[0].user_attrs:
        raise StudyNotFound(f"study {study_name} has no trial #{number} with stored scores; "
                            f"see hpo sql \"SELECT number, state FROM trials\"")
    trial = trials[0]
    params = suggest_params(spec, optuna.trial.FixedTrial(trial.params, number=number))
    seeds = list(trial.user_attrs[ATTR_SEEDS])
    pruned_at = trial.user_attrs.get(ATTR_PRUNED_AT)
    stop = None if pruned_at is None else (lambda epoch, scores: epoch >= pruned_at)
    try:
        path = trial.user_attrs.get("training_path")
        fit = fit_repeats(spec, params, seeds, stop, path=path if path in ("vectorized", "sequential") else None,
                          backend=trial.user_attrs.get(ATTR_BACKEND))
    finally:
        release_memory()
    return ReplayResult(dict(trial.params), seeds, list(trial.user_attrs[ATTR_SEED_SCORES]), fit.scores)
