"""Storage settings: masked passwords, SQLite in WAL mode, the budget's trial count."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from hpo.store.storage import count_trials, get_storage, rdb_storage
from tests.conftest import ROOT, run_hpo


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


def test_sqlite_commits_sync_the_log_at_checkpoints_not_at_every_commit(tmp_path):
    # synchronous=NORMAL in WAL mode: a killed worker loses nothing, and a trial's epoch
    # reports do not each wait for the disk. Every connection of the engine has it, the
    # first ones Optuna opened while creating its tables included.
    import sqlalchemy

    storage = get_storage(f"sqlite:///{tmp_path / 'study.db'}")
    optuna.create_study(study_name="sync", storage=storage).ask().report(1.0, 0)
    with storage.engine.connect() as a, storage.engine.connect() as b:
        for conn in (a, b):
            assert conn.execute(sqlalchemy.text("PRAGMA synchronous")).scalar() == 1  # NORMAL


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


def test_a_full_disk_stops_the_run_at_once_naming_the_cause(tmp_path):
    """A real full disk (a 2 MB tmpfs under the SQLite file) is permanent: the run stops at
    once with one line that says the disk is full, instead of retrying as if the database
    were unreachable. Needs root to mount the tmpfs."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        result = run_hpo("run", "beale", "--trials", "100000", "--storage", f"sqlite:///{mount / 'full.db'}",
                         env={"HPO_DB_RETRY_SECONDS": "600"}, check=False, timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert "disk is full" in errors[0] and "unreachable" not in result.stderr and "waiting" not in result.stderr


def test_a_read_only_database_is_permanent_and_a_refused_connection_transient(tmp_path):
    import sqlite3

    import sqlalchemy

    from hpo.store.faults import classify_storage_error

    db = tmp_path / "ro.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    engine = sqlalchemy.create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    except sqlalchemy.exc.OperationalError as e:
        kind, cause = classify_storage_error(e)
    assert kind == "permanent" and "read-only" in cause
    refused = sqlalchemy.create_engine("postgresql+psycopg://u@127.0.0.1:1/x")
    try:
        refused.connect()
    except sqlalchemy.exc.OperationalError as e:
        assert classify_storage_error(e)[0] == "transient"


def test_an_unreachable_postgresql_url_on_run_is_one_line_that_says_run(tmp_path):
    result = run_hpo("run", "beale", "--storage", "postgresql+psycopg://hpo@127.0.0.1:1/none", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: storage postgresql+psycopg://hpo@127.0.0.1:1/none unreachable")
    assert "run hpo run again" in lines[0] and "worker" not in lines[0]


def test_processes_opening_a_fresh_database_at_once_all_open_it(storage_url, tmp_path):
    """Several processes opening an empty database at the same moment (a compose stack's
    proxy and `create`, workers started together on a new PostgreSQL): each creating
    Optuna's tables collides with the others (PostgreSQL: a duplicate key in its catalog;
    SQLite: a table that already exists); each must open it all the same."""
    go = tmp_path / "go"
    # Each process imports, says it is ready, and waits for the others: under load the
    # imports take seconds, and the opening must still come at one moment.
    code = ("import pathlib, sys, time; from hpo.store.storage import get_storage; "
            "pathlib.Path(sys.argv[2]).touch(); go = pathlib.Path(sys.argv[3]); "
            "[time.sleep(0.01) for _ in iter(lambda: go.exists(), True)]; get_storage(sys.argv[1]); print('opened')")
    procs = [subprocess.Popen([sys.executable, "-c", code, storage_url, str(tmp_path / f"ready{i}"), str(go)],
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(6)]
    deadline = time.monotonic() + 180
    while not all((tmp_path / f"ready{i}").exists() for i in range(6)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    assert all(out.strip() == "opened" for out, _ in results), [err[-600:] for _, err in results]


def test_every_call_of_a_worker_survives_a_dropped_connection(postgres, capsys):
    """A study's storage is Optuna's cache around hpo's: it reads and writes through private
    methods (`_get_trials`, `_create_new_trial`, `_set_trial_param`, `_get_best_trial_id`),
    which must wait out a dropped connection as the public ones do, and so must hpo's own
    SQL (the budget's count, the admission lock). A PostgreSQL restart once killed TPE's
    read of the trials mid-query, and the trial was failed as if by its own fault, spending
    the budget; another killed `hpo run`'s count after its workers had finished."""
    import psycopg
    import sqlalchemy

    from hpo.store.storage import heartless_trial_ids, study_lock

    url = postgres.create_database()
    storage = get_storage(url)
    study = optuna.create_study(study_name="drop", storage=storage)
    dropped = []

    def drop_this_connection(conn, cursor, *args) -> None:
        # The server ends this statement's connection before the statement reaches it, as
        # a restart or pg_terminate_backend does: the real fault, at a chosen moment.
        if dropped and dropped[-1] is None:
            pid = conn.connection.dbapi_connection.info.backend_pid
            with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=hpo dbname=postgres",
                                 autocommit=True) as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0]
            dropped[-1] = pid

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", drop_this_connection)

    def through_a_drop(call):
        dropped.append(None)
        result = call()
        assert dropped[-1] is not None, "no statement ran, so nothing was dropped"
        return result

    trial = through_a_drop(study.ask)
    x = through_a_drop(lambda: trial.suggest_float("x", -1, 1))
    study.tell(trial, x * x)
    assert [t.params for t in through_a_drop(study.get_trials)] == [{"x": x}]
    assert through_a_drop(lambda: study.best_trial).number == trial.number
    assert through_a_drop(lambda: count_trials(storage, study._study_id)).complete == 1
    assert through_a_drop(lambda: heartless_trial_ids(storage, study._study_id)) == []

    def admit() -> None:
        with study_lock(storage, study._study_id):
            pass
    through_a_drop(admit)
    assert "reachable again" in capsys.readouterr().err
