"""Studies: a `StudySpec` and a storage in, an Optuna study (created or loaded) out.

The validated spec is stored with the study, so any worker can rebuild it from the
database alone; the sampler and pruner are made from it the same way everywhere.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import optuna
from optuna.samplers._lazy_random_state import LazyRandomState

from hpo.errors import SpecError, StudyNotFound
from hpo.record import SPEC_ATTR
from hpo.specs import StudySpec, parse_spec, spec_to_dict
from hpo.store.urls import mask_url
from hpo.store.views import create_views

# Keys of the stored spec that may change between runs of one study.
_MUTABLE_KEYS = ("trials", "description", "base_dir")


def quiet_optuna() -> None:
    """Keep Optuna's own logging for errors: our progress lines say what happened (a caught
    trial failure would otherwise print a traceback), and our use of its experimental
    `set_metric_names` and `constant_liar` is deliberate."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Workers beat their own heartbeats around study.ask/tell; Optuna warns it expects optimize().
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler, its randomness drawn afresh for each trial from the spec's seed
    and the trial's number (`seed_each_trial`): whichever worker or process asks for
    trial N, and whether the run restarted, was interrupted and topped up, or ran straight
    through, trial N is proposed from the same random state."""
    seed = spec.sampler.seed
    kind = spec.sampler.kind
    sampler: optuna.samplers.BaseSampler
    if kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif kind == "grid":
        from hpo.specs.space import grid_search_space

        sampler = optuna.samplers.GridSampler(grid_search_space(spec), seed=seed)
    elif kind == "cmaes":
        _require(spec, "cmaes", "cmaes")
        sampler = optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials)
    elif kind == "gp":
        _require(spec, "torch", "torch")
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
                                             constant_liar=True)
    if seed is not None:
        seed_each_trial(sampler, seed)
    return sampler


def seed_each_trial(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Make `sampler` reseed every random state it holds from (seed, trial number) just
    before each trial is sampled (Optuna calls `before_trial` before any sampling).

    A seeded Optuna sampler otherwise draws from one stream for its whole life, so a
    process that restarts, or a second worker, proposes different trials than one
    process running straight through.
    """
    before_trial = sampler.before_trial

    def reseeded_before_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        for i, state in enumerate(_random_states(sampler)):
            state.seed(int(np.random.SeedSequence([seed, trial.number, i]).generate_state(1)[0]))
        before_trial(study, trial)

    sampler.before_trial = reseeded_before_trial  # type: ignore[method-assign]


def _random_states(obj: object, seen: set[int] | None = None) -> list[np.random.RandomState]:
    """Every NumPy random state held by a sampler and the samplers inside it, in a fixed order."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = []
    for _, value in sorted(vars(obj).items()):
        if isinstance(value, LazyRandomState):
            found.append(value.rng)
        elif isinstance(value, np.random.RandomState):
            found.append(value)
        elif isinstance(value, optuna.samplers.BaseSampler):
            found += _random_states(value, seen)
    return found


def _require(spec: StudySpec, module: str, package: str) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise SpecError(spec.source, "sampler.kind", f'the "{spec.sampler.kind}" sampler needs the {package} '
                                                     f'package; pip install {package}, or choose kind = "tpe"') from e


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; steps are epochs, counted from 1 as hpo prints them, so a
    successive-halving rung of `min_resource` epochs is reached after that many epochs.
    `n_warmup_steps` is the epochs every trial runs before it may be pruned: Optuna counts
    steps from 0 (its earliest prune is at step == n_warmup_steps), hence the + 1."""
    p = spec.pruner
    warmup = p.n_warmup_steps + 1
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=warmup)
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=spec.training.max_epochs,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=warmup)


def create_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the spec's study, or load it if it exists with the same spec.

    Raises:
        SpecError: A study of that name exists with a different spec.
    """
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec),
                                pruner=make_pruner(spec), directions=spec.directions, load_if_exists=True)
    if isinstance(storage, optuna.storages.RDBStorage):
        create_views(storage.engine)
    stored = study.user_attrs.get(SPEC_ATTR)
    wanted = spec_to_dict(spec)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, wanted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.metric_names)
        return study
    if _comparable(stored) != _comparable(wanted):
        changed = sorted(k for k in set(stored) | set(wanted) if k not in _MUTABLE_KEYS and stored.get(k) != wanted.get(k))
        raise SpecError(spec.source, ", ".join(changed),
                        f'study "{spec.name}" already exists in this storage with a different spec; '
                        "run with --study-name NEW_NAME to start a new study, or restore the old settings")
    if stored != wanted:
        # A new budget or description: `hpo worker` reads the budget from here.
        study.set_user_attr(SPEC_ATTR, wanted)
    return study


def load_study(storage: optuna.storages.BaseStorage, study_name: str) -> tuple[optuna.Study, StudySpec]:
    """Load a study and rebuild its spec from the database (no study file needed).

    Raises:
        StudyNotFound: No study of that name, or it was not created by hpo.
    """
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError as e:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        where = mask_url(getattr(storage, "url", "")) or "this storage"
        raise StudyNotFound.named(study_name, names, where) from e
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise StudyNotFound(f'study "{study_name}" was not created by hpo (no stored spec); create it with hpo create')
    spec = parse_spec(raw, source=f"study {study_name}", check_files=False)
    study.sampler = make_sampler(spec)
    study.pruner = make_pruner(spec)
    return study, spec


def _comparable(raw: dict) -> str:
    return json.dumps({k: v for k, v in raw.items() if k not in _MUTABLE_KEYS}, sort_keys=True)
