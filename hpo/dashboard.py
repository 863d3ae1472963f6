"""Dashboard: a study database URL in, optuna-dashboard serving it out, after every
finished trial of every hpo study got its markdown note (per-seed scores, diagnosis).

Notes are written where a trial is recorded (the objective, while the trial still runs);
`hpo dashboard` only fills in the trials that lack one: those recorded before notes
existed, or by a worker that could not import optuna-dashboard.
"""

from __future__ import annotations

import os
from typing import Callable

import optuna
import sqlalchemy
from optuna.trial import TrialState

from hpo.diagnosis import trial_note
from hpo.errors import StorageError
from hpo.storage import get_storage, mask_url, resolve_storage_url
from hpo.study import SPEC_ATTR

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_missing_notes(storage: str | None = None, echo: Callable[[str], None] = lambda _: None) -> int:
    """Give every finished trial with a per-seed record, in every study created by hpo,
    a note if it has none. Returns how many notes were written."""
    from optuna_dashboard import save_note
    from optuna_dashboard._note import note_ver_key

    rdb = get_storage(storage)
    written = 0
    for summary in optuna.get_all_study_summaries(rdb, include_best_trial=False):
        if SPEC_ATTR not in summary.user_attrs:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=rdb)
        # The dashboard keeps notes as study system attributes, one version key per trial.
        noted = set(rdb.get_study_system_attrs(study._study_id))
        missing = [t for t in study.get_trials(deepcopy=False, states=FINISHED)
                   if "seed_scores" in t.user_attrs and note_ver_key(t._trial_id) not in noted]
        if not missing:
            continue
        echo(f"writing notes for {len(missing)} trials of {summary.study_name}")
        metric = summary.user_attrs[SPEC_ATTR].get("metric", "score")
        for frozen in missing:
            # save_note takes a live Trial; one made for a finished trial only locates it.
            body = trial_note(frozen.number, frozen.user_attrs, metric)
            save_note(optuna.trial.Trial(study, frozen._trial_id), body)
        written += len(missing)
    return written


def serve_dashboard(storage: str | None = None, host: str = "127.0.0.1", port: int = 8080,
                    echo: Callable[[str], None] = print) -> None:
    """Fill in missing trial notes, then serve optuna-dashboard until interrupted."""
    from optuna_dashboard import run_server

    url = resolve_storage_url(storage)
    database = sqlalchemy.engine.make_url(url).database if url.startswith("sqlite") else None
    if database is not None and not os.path.isfile(database):
        raise StorageError(f"no study database at {database!r}; run a study first (hpo run ...) or pass --storage")
    write_missing_notes(url, echo)
    echo(f"optuna-dashboard for {mask_url(url)} at http://{host}:{port}/ (Ctrl-C stops it)")
    run_server(get_storage(url), host=host, port=port)
