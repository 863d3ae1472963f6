"""Storage settings: masked passwords, SQLite in WAL mode, the budget's trial count."""

from __future__ import annotations

import sqlite3

import optuna
import pytest
from optuna.trial import TrialState

from hpo.storage import count_trials, get_storage, rdb_storage
from tests.conftest import run_hpo


def test_password_is_never_printed():
    url = "postgresql+psycopg://bob:s3cret-pw@127.0.0.1:1/nowhere"
    result = run_hpo("run", "beale", "--storage", url, env={"HPO_DB_RETRY_SECONDS": "1"}, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "bob:***@127.0.0.1:1/nowhere" in output and "s3cret" not in output


def test_sqlite_file_is_switched_to_wal(tmp_path):
    path = tmp_path / "study.db"
    get_storage(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_count_trials_tells_own_failures_from_lost_ones(storage_url):
    study = optuna.create_study(study_name="counts", storage=get_storage(storage_url))
    study.add_trial(optuna.create_trial(value=1.0))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, intermediate_values={0: 1.0}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "diverged"}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL))
    study.add_trial(optuna.create_trial(state=TrialState.WAITING))
    study.ask()
    counts = count_trials(rdb_storage(study._storage), study._study_id)
    assert (counts.complete, counts.pruned, counts.failed, counts.lost) == (1, 1, 1, 1)
    # ask() took the waiting trial first, as it does with a retried one.
    assert (counts.running, counts.waiting, counts.spent) == (1, 0, 3)
