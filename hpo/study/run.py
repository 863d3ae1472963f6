"""One run of a study: a spec and a storage URL in; the spec checked, its study created
(or joined), an earlier stop cleared, the opening line said and trials run until the
study holds its budget (here, or in N local worker processes) out. `hpo run` and
`hpo.api.start` both are this.
"""

from __future__ import annotations

from typing import Callable

import optuna

from hpo.specs import StudySpec
from hpo.store.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, get_storage
from hpo.store.urls import mask_url
from hpo.study.local import describe_threads, run_workers
from hpo.study.study import create_study
from hpo.study.workers import RunSummary, clear_stop, memory_growth_limit, run_trials
from hpo.words import plural


def run_study(spec: StudySpec, storage_url: str, *, workers: int = 1, timeout: float | None = None,
              max_failures: int = 5, heartbeat_interval: int | None = None, grace_period: int | None = None,
              max_memory_growth: float | None = None, header: bool = True,
              created: Callable[[optuna.Study], None] | None = None, echo: Callable[[str], None] = print,
              echo_err: Callable[[str], None] | None = None) -> tuple[optuna.Study, RunSummary]:
    """Check the spec (its data and model built once), create or join its study, clear a
    stop an earlier run left, say what will run (unless `header` is False) and run trials
    until the study holds `spec.trials`: in this process, or in `workers` local processes.

    `created` is called with the study before any trial runs.

    Raises:
        SpecError: The spec's data or model cannot be built; nothing was written.
        OptionError: The grace period is not longer than the heartbeat interval.
        StorageError: The database cannot be reached or opened.
    """
    from hpo.train.fit import check_spec_runs

    check_spec_runs(spec)
    study = create_study(spec, get_storage(storage_url, heartbeat_interval=heartbeat_interval or HEARTBEAT_INTERVAL,
                                           grace_period=grace_period or GRACE_PERIOD, command="run"))
    clear_stop(study)
    if created is not None:
        created(study)
    if header:
        echo(describe_start(spec, storage_url))
        if workers > 1:
            echo(describe_threads(spec, workers))
    if workers > 1:
        summary = run_workers(storage_url, spec, workers, budget=spec.trials, timeout=timeout,
                              max_consecutive_failures=max_failures, heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period, max_memory_growth=max_memory_growth, echo=echo,
                              echo_err=echo_err)
    else:
        summary = run_trials(study, spec, budget=spec.trials, timeout=timeout, max_consecutive_failures=max_failures,
                             echo=echo, max_memory_growth_mb=memory_growth_limit(spec, max_memory_growth))
    return study, summary


def describe_start(spec: StudySpec, storage: str) -> str:
    """The line a run opens with: the study, where it is stored, its budget and objective."""
    seeds = (f"{spec.seeds}-{spec.seeds_max} seeds each (adaptive)" if spec.seeds_max
             else f"{plural(spec.seeds, 'seed')} each")
    return (f"study {spec.name} ({spec.source}) on {mask_url(storage)}: budget {plural(spec.trials, 'trial')}, "
            f"{seeds}, up to {plural(spec.training.max_epochs, 'epoch')}, {spec.metric} "
            f"({spec.direction}), objective {spec.objective.mode}")
