"""Workers with real processes on real databases: exact budgets, a worker SIGKILLed
mid-trial, a PostgreSQL restart, several workers on one SQLite file, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, run_hpo, wait_until

SLOW_STUDY = """
name = "{name}"
seeds = 1
trials = {trials}
[model]
family = "analytic"
function = "beale"
epoch_seconds = {epoch_seconds}
[training]
max_epochs = 8
patience = 100
[pruner]
kind = "none"
[space]
x = {{ low = -4.5, high = 4.5 }}
y = {{ low = -4.5, high = 4.5 }}
"""


def write_study(tmp_path: Path, name: str = "slow", trials: int = 12, epoch_seconds: float = 0.15) -> Path:
    """A beale study whose trials sleep 8 x epoch_seconds (none pruned), in tmp_path."""
    path = tmp_path / f"{name}.toml"
    path.write_text(SLOW_STUDY.format(name=name, trials=trials, epoch_seconds=epoch_seconds))
    return path


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def by_state(trials: list, state: TrialState) -> list:
    return [t for t in trials if t.state == state]


def start_hpo(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpo", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line with {needle!r} from {proc.args}")


def processes_with(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (the tests' unique study names)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_budget_race_never_more_than_budget(storage_url):
    """Eight workers race for six instant trials: exactly six finish, none is left over."""
    result = run_hpo("run", "beale", "--storage", storage_url, "--trials", "6", "--workers", "8", timeout=300)
    trials = trials_of(storage_url, "beale")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6, result.stdout
    assert len(trials) == 6, [(t.number, t.state) for t in trials]  # no trial started and given back


def test_workers_share_a_study_through_pgbouncer_with_two_server_connections(postgres, pgbouncer):
    """Six workers through PgBouncer in transaction mode, two server connections: a
    worker waiting for the admission lock holds none (the holder needs one for its own
    queries), no statement is prepared on a connection another transaction may not get.
    (`hpo sql` keeps prepared statements, which refuse a second statement in a query,
    and so talks to PostgreSQL itself, not through the pooler.)"""
    url = pgbouncer.url(postgres.create_database())
    result = run_hpo("run", "beale", "--storage", url, "--trials", "30", "--workers", "6", timeout=300)
    trials = trials_of(url, "beale")
    assert len(by_state(trials, TrialState.COMPLETE)) + len(by_state(trials, TrialState.PRUNED)) == 30, result.stdout
    assert len(trials) == 30, [(t.number, t.state) for t in trials]
    assert len({t.user_attrs["worker"] for t in trials}) > 1


def test_four_workers_on_one_sqlite_file(tmp_path):
    """Four local workers share one SQLite file: no lock errors, exact budget."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = run_hpo("run", "beale", "--storage", url, "--trials", "40", "--workers", "4", timeout=300)
    output = result.stdout + result.stderr
    assert "locked" not in output and "waiting for the database" not in output, output
    trials = trials_of(url, "beale")
    assert len(by_state(trials, TrialState.COMPLETE)) + len(by_state(trials, TrialState.PRUNED)) == 40
    assert len(trials) == 40
    workers_seen = set(re.findall(r"^(w\d+) trial ", result.stdout, re.MULTILINE))
    assert workers_seen == {"w0", "w1", "w2", "w3"}
    # Each trial names the worker (host:pid) that ran it.
    assert len({t.user_attrs["worker"] for t in trials}) == 4


def running_trial_with_params_and_heartbeat(url: str, n_params: int = 2) -> int | None:
    """A RUNNING trial whose params (all `n_params` of the beale space, x and y: a trial
    stopped between its two suggestions is retried with x alone) are stored and whose
    heartbeat was recorded, or None."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text(
                "SELECT t.number FROM trials t WHERE t.state = 'RUNNING' "
                "AND (SELECT count(*) FROM trial_params p WHERE p.trial_id = t.trial_id) >= :n "
                "AND EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)"), {"n": n_params}).scalar()
    finally:
        engine.dispose()


def stop_mid_trial(proc: subprocess.Popen, url: str) -> int:
    """SIGSTOP the only worker of a study while its trial is RUNNING with params and a
    heartbeat (a trial that finished between the look and the stop does not count: go on
    and look again); the trial's number."""
    while True:
        wait_until(lambda: running_trial_with_params_and_heartbeat(url) is not None, "a running trial with params")
        proc.send_signal(signal.SIGSTOP)
        number = running_trial_with_params_and_heartbeat(url)
        if number is not None:
            return number
        proc.send_signal(signal.SIGCONT)


def test_sigkilled_worker_trial_is_retried_with_same_params(storage_url, tmp_path):
    """A worker SIGKILLed mid-trial (its params stored, its heartbeat seen), two more
    workers, twelve trials: twelve finish, the killed trial is failed and run again with
    the same params and seeds."""
    spec = write_study(tmp_path, "killed", trials=12)
    run_hpo("create", str(spec), "--storage", storage_url)
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    workers = [start_hpo("worker", "--storage", storage_url, "--study-name", "killed", "--worker-index", "0", *beat)]
    try:
        killed_number = stop_mid_trial(workers[0], storage_url)
        workers[0].kill()
        workers[0].wait()
        workers += [start_hpo("worker", "--storage", storage_url, "--study-name", "killed", "--worker-index", str(i),
                              *beat) for i in (1, 2)]
        for w in workers[1:]:
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, out + err
    finally:
        for w in workers:
            w.kill()
            w.wait()
    trials = trials_of(storage_url, "killed")
    assert len(by_state(trials, TrialState.COMPLETE)) == 12
    assert not by_state(trials, TrialState.RUNNING)
    killed = by_state(trials, TrialState.FAIL)
    assert [t.number for t in killed] == [killed_number] and "fail_reason" not in killed[0].user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed[0].params
    assert retries[0].user_attrs["seeds"] == killed[0].user_attrs["seeds"]


def test_workers_survive_a_postgresql_restart(postgres, tmp_path):
    """PostgreSQL is stopped and started again while two workers run: both carry on and
    the study ends complete, with nothing lost."""
    url = postgres.create_database()
    # Trials long enough (1.6 s) that the workers are still at them when the server stops.
    spec = write_study(tmp_path, "restart", trials=10, epoch_seconds=0.2)
    proc = start_hpo("run", str(spec), "--storage", url, "--workers", "2", "--heartbeat-interval", "1")
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_for_line(proc, "trial ")
        postgres.stop()
        # Down until a worker has felt it, however long that takes under load.
        wait_until(lambda: any("waiting for the database to come back" in line for line in errors),
                   "a worker to meet the outage")
        postgres.start()
        out = proc.stdout.read()
        proc.wait(timeout=180)
        reader.join(timeout=60)
        err = "".join(errors)
    finally:
        proc.kill()
        proc.wait()
        postgres.start_if_stopped()
    assert proc.returncode == 0, out + err
    assert "waiting for the database to come back" in err and "reachable again" in err, err  # felt, and survived
    trials = trials_of(url, "restart")
    seen = [(t.number, t.state.name, t.user_attrs.get("fail_reason") or t.user_attrs.get("interrupted"))
            for t in trials]
    assert len(by_state(trials, TrialState.COMPLETE)) == 10, (seen, err)
    assert not by_state(trials, TrialState.RUNNING), seen


# The server refuses every new row of a trial once it has reported two epochs, with the
# error PostgreSQL raises when its disk is full (SQLSTATE 53100): the writes that fail
# when a disk fills mid-trial. Updating a trial's state, which rewrites a row in place,
# still succeeds, as it may on a full disk.
DISK_FULL = """
CREATE FUNCTION hpo_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM trial_intermediate_values v WHERE v.trial_id = NEW.trial_id) >= 2 THEN
        RAISE EXCEPTION 'could not extend file "base/1/2": No space left on device' USING ERRCODE = 'disk_full';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER full_values BEFORE INSERT OR UPDATE ON trial_intermediate_values
    FOR EACH ROW EXECUTE FUNCTION hpo_test_disk_full();
CREATE TRIGGER full_attrs BEFORE INSERT OR UPDATE ON trial_user_attributes
    FOR EACH ROW EXECUTE FUNCTION hpo_test_disk_full();
CREATE TRIGGER full_value BEFORE INSERT OR UPDATE ON trial_values
    FOR EACH ROW EXECUTE FUNCTION hpo_test_disk_full();
"""


# The server drops every connection to the study's database as the first heartbeat is
# written (after the trial itself was created and committed), and again at the first
# writes that would give that trial back: a database restarting, failing over, or an
# administrator's pg_terminate_backend. Sequences count outside the transactions that
# die with their connections.
DROP_CONNECTIONS = """
CREATE FUNCTION hpo_test_drop_once(counter regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF nextval(counter) = 1 THEN
        PERFORM pg_terminate_backend(pid) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid();
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
END $$;
CREATE SEQUENCE hpo_test_beat;
CREATE SEQUENCE hpo_test_reason;
CREATE SEQUENCE hpo_test_state;
CREATE FUNCTION hpo_test_drop_beat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM hpo_test_drop_once('hpo_test_beat'); RETURN NEW; END $$;
CREATE FUNCTION hpo_test_drop_reason() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM hpo_test_drop_once('hpo_test_reason'); RETURN NEW; END $$;
CREATE FUNCTION hpo_test_drop_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM hpo_test_drop_once('hpo_test_state'); RETURN NEW; END $$;
CREATE TRIGGER drop_beat BEFORE INSERT ON trial_heartbeats FOR EACH ROW EXECUTE FUNCTION hpo_test_drop_beat();
CREATE TRIGGER drop_reason BEFORE INSERT ON trial_user_attributes FOR EACH ROW WHEN (NEW.key = 'interrupted')
    EXECUTE FUNCTION hpo_test_drop_reason();
CREATE TRIGGER drop_state BEFORE UPDATE ON trials FOR EACH ROW WHEN (NEW.state = 'FAIL')
    EXECUTE FUNCTION hpo_test_drop_state();
"""


def created_study(postgres, tmp_path, name):
    """A new PostgreSQL database holding the study `name` (3 instant trials), created."""
    url = postgres.create_database()
    spec = write_study(tmp_path, name, trials=3, epoch_seconds=0.0)
    run_hpo("create", str(spec), "--storage", url)
    return url, spec


def execute(url, sql):
    """Run SQL on the database (the tests' triggers that play a failing server)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(sql))
    finally:
        engine.dispose()


def test_a_trial_whose_admission_lost_the_connection_is_given_back_at_once(postgres, tmp_path):
    """Not left RUNNING for the grace period, holding budget that every worker waits on."""
    url, spec = created_study(postgres, tmp_path, "dropped")
    execute(url, DROP_CONNECTIONS)
    # A grace period longer than the run may take: only a trial given back at once lets it end.
    result = run_hpo("run", str(spec), "--storage", url, "--heartbeat-interval", "1", "--grace-period", "3600",
                     timeout=120)
    assert "waiting for the database to come back" in result.stderr, result.stderr
    trials = trials_of(url, "dropped")
    assert len(by_state(trials, TrialState.COMPLETE)) == 3 and not by_state(trials, TrialState.RUNNING)
    assert not by_state(trials, TrialState.WAITING)
    # Given back, not failed on their own: they do not count, and each was retried.
    lost = by_state(trials, TrialState.FAIL)
    assert lost and all("lost the database connection" in t.user_attrs["interrupted"] for t in lost), lost
    assert "fail_reason" not in lost[0].user_attrs


def test_a_disk_that_fills_mid_trial_stops_with_one_line_and_leaves_no_trial_running(postgres, tmp_path):
    url, spec = created_study(postgres, tmp_path, "full")
    execute(url, DISK_FULL)
    result = run_hpo("run", str(spec), "--storage", url, check=False, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: storage ") and "No space left on device" in result.stderr
    assert "disk is full; free space and run again" in result.stderr
    trials = trials_of(url, "full")
    assert not by_state(trials, TrialState.RUNNING), [(t.number, t.state) for t in trials]
    lost = by_state(trials, TrialState.FAIL)
    # Given back, not failed on its own: it does not count, and waits to be retried.
    assert len(lost) == 1 and "fail_reason" not in lost[0].user_attrs
    assert [t.params for t in by_state(trials, TrialState.WAITING)] == [lost[0].params]
    execute(url, "DROP FUNCTION hpo_test_disk_full() CASCADE")  # space is freed
    run_hpo("run", str(spec), "--storage", url, timeout=300)
    trials = trials_of(url, "full")
    assert len(by_state(trials, TrialState.COMPLETE)) == 3
    assert not by_state(trials, TrialState.RUNNING) and not by_state(trials, TrialState.WAITING)
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == lost[0].number]
    assert len(retry) == 1 and retry[0].params == lost[0].params and retry[0].state == TrialState.COMPLETE


def test_sigterm_stops_every_worker_and_leaves_no_trial_running(tmp_path):
    """SIGTERM to `hpo run --workers 2` stops both workers; their trials are failed (not
    counted) and queued again, and the next run ends with the exact budget."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "sigterm_study", trials=8, epoch_seconds=0.3)
    proc = start_hpo("run", str(spec), "--storage", url, "--workers", "2")
    try:
        wait_for_line(proc, "trial ")
        # Into a trial that has started (and will not finish by itself for 2.4 s).
        wait_until(lambda: running_trial_with_params_and_heartbeat(url) is not None, "a running trial")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, out + err
    assert processes_with("sigterm_study") == []
    trials = trials_of(url, "sigterm_study")
    assert not by_state(trials, TrialState.RUNNING)
    interrupted = [t for t in by_state(trials, TrialState.FAIL) if "interrupted" in t.user_attrs]
    assert interrupted, [(t.number, t.state, t.user_attrs) for t in trials]
    assert len(by_state(trials, TrialState.WAITING)) == len(interrupted)
    run_hpo("run", str(spec), "--storage", url, "--workers", "2", timeout=300)
    trials = trials_of(url, "sigterm_study")
    assert len(by_state(trials, TrialState.COMPLETE)) == 8
    assert not by_state(trials, TrialState.WAITING) and not by_state(trials, TrialState.RUNNING)
    assert {t.number for t in interrupted} <= {t.system_attrs.get("failed_trial") for t in trials}
    retries = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert retries and not any("interrupted" in t.user_attrs for t in retries if t.state == TrialState.COMPLETE)


def test_consecutive_failures_stop_the_study(tmp_path):
    """Trials that fail on their own count against the budget, and a run of them stops
    every worker with a message that says why."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = tmp_path / "diverges.toml"
    spec.write_text(SLOW_STUDY.format(name="diverges", trials=20, epoch_seconds=0.0)
                    .replace("low = -4.5, high = 4.5", "low = 1e60, high = 1e61"))
    result = run_hpo("run", str(spec), "--storage", url, "--workers", "2", "--max-failures", "3", check=False)
    assert result.returncode == 1
    assert "stopped the study after 3 failed trials in a row; last reason: OverflowError" in result.stdout
    trials = trials_of(url, "diverges")
    failed = by_state(trials, TrialState.FAIL)
    assert 3 <= len(failed) < 20 and all("fail_reason" in t.user_attrs for t in failed)
    assert not by_state(trials, TrialState.RUNNING)


def test_workers_auto_starts_the_count_measured_fastest_here(tmp_path):
    """`hpo bench-workers throughput` records the fastest worker count for this machine's
    cores; `hpo run --workers auto` then starts that many and says why. Without a record,
    or with a damaged one, it starts one per core and says how to measure."""
    from hpo.backend import available_cores

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    cores = available_cores()
    first = run_hpo("run", "beale", "--workers", "auto", "--trials", "2", "--storage", f"sqlite:///{tmp_path / 'a.db'}",
                    env=env)
    assert first.stdout.startswith(f"--workers auto: {cores} (one per core"), first.stdout
    run_hpo("bench-workers", "throughput", "beale", "--trials", "2", "--workers", "1,2", "--storage",
            f"sqlite:///{tmp_path / 'b.db'}", env=env)
    record = json.loads((tmp_path / "cache" / "hpo" / "workers.json").read_text())[str(cores)]
    rates = {int(n): r for n, r in record["rates"].items()}
    assert set(rates) == {1, 2} and record["workers"] == max(rates, key=rates.get) and record["study"] == "beale"
    measured = run_hpo("run", "beale", "--workers", "auto", "--trials", "2", "--storage",
                       f"sqlite:///{tmp_path / 'c.db'}", env=env)
    assert measured.stdout.startswith(f"--workers auto: {record['workers']} (fastest measured on"), measured.stdout
    assert "finished" in measured.stdout or "complete" in measured.stdout
    for i, damage in enumerate(["{not json", json.dumps({str(cores): {"workers": 2, "rates": ["fast"]}})]):
        (tmp_path / "cache" / "hpo" / "workers.json").write_text(damage)
        damaged = run_hpo("run", "beale", "--workers", "auto", "--trials", "2", "--storage",
                          f"sqlite:///{tmp_path / f'd{i}.db'}", env=env)
        assert damaged.stdout.startswith(f"--workers auto: {cores} (one per core"), damaged.stdout


def test_workers_share_the_cores():
    from hpo.backend import limit_threads
    from hpo.study.local import worker_threads

    assert worker_threads(4, cores=8) == 2 and worker_threads(3, cores=2) == 1
    env = dict(os.environ)
    try:
        os.environ.pop("XLA_FLAGS", None)
        limit_threads(2)
        assert (os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"]) == ("2", "1")
        assert os.environ["XLA_FLAGS"] == "intra_op_parallelism_threads=2"
        os.environ["XLA_FLAGS"] = "--xla_dump_to=/tmp/x"
        limit_threads(1)
        assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")
        os.environ["XLA_FLAGS"] = "intra_op_parallelism_threads=4"
        limit_threads(1)
        assert os.environ["XLA_FLAGS"] == "intra_op_parallelism_threads=4"  # the user's own setting wins
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_a_trial_whose_worker_died_before_it_had_params_is_retried_cleanly(storage_url, tmp_path):
    """A worker killed between starting a trial (its heartbeat recorded) and storing its
    params: the trial is failed once its heartbeat is stale, not counted, and its retry
    draws params of its own; nothing is left RUNNING or WAITING."""
    from hpo.store.storage import get_storage

    spec = write_study(tmp_path, "paramless", trials=3, epoch_seconds=0.0)
    run_hpo("create", str(spec), "--storage", storage_url)
    storage = get_storage(storage_url, heartbeat_interval=1, grace_period=3)
    orphan = optuna.load_study(study_name="paramless", storage=storage).ask()
    storage.record_heartbeat(orphan._trial_id)
    storage.engine.dispose()
    run_hpo("run", str(spec), "--storage", storage_url, "--heartbeat-interval", "1", "--grace-period", "3",
            timeout=300)
    trials = trials_of(storage_url, "paramless")
    assert trials[0].state == TrialState.FAIL and trials[0].params == {} and "fail_reason" not in trials[0].user_attrs
    assert len(by_state(trials, TrialState.COMPLETE)) == 3
    assert not by_state(trials, TrialState.RUNNING) and not by_state(trials, TrialState.WAITING)
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and set(retry[0].params) == {"x", "y"}


def test_keras_workers_start_without_forking_a_process_that_runs_jax(tmp_path):
    """`hpo run --workers 2` on a Keras study has built its model (JAX threads running)
    before it starts the workers: they start as new processes, with no fork and so no
    JAX warning about one, each with its share of the cores named by backend."""
    from hpo.study.local import worker_threads

    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = run_hpo("run", "sequence_toy", "--storage", url, "--trials", "2", "--seeds", "1", "--max-epochs", "1",
                     "--workers", "2", env={"HPO_BACKEND": "jax"})
    assert "RuntimeWarning" not in result.stderr and "os.fork" not in result.stderr, result.stderr
    threads = worker_threads(2)
    assert f"2 workers, {threads} JAX thread{'s' if threads > 1 else ''} each" in result.stdout
    assert "TensorFlow" not in result.stdout
    trials = trials_of(url, "sequence_toy")
    assert len(by_state(trials, TrialState.COMPLETE)) + len(by_state(trials, TrialState.PRUNED)) == 2 == len(trials)


def test_workers_of_a_killed_run_stop_and_its_trials_are_retried(tmp_path):
    """`hpo run --workers 2` SIGKILLed: its workers get SIGTERM from the kernel (they
    asked for it themselves, not through a fork hook), give their trials back and exit;
    the next run ends with the exact budget."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "orphans", trials=6, epoch_seconds=0.3)
    proc = start_hpo("run", str(spec), "--storage", url, "--workers", "2")
    try:
        wait_for_line(proc, "trial ")
        assert len(processes_with("orphans")) == 3
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while processes_with("orphans") and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert processes_with("orphans") == []
    trials = trials_of(url, "orphans")
    assert not by_state(trials, TrialState.RUNNING)
    run_hpo("run", str(spec), "--storage", url, "--workers", "2", timeout=300)
    trials = trials_of(url, "orphans")
    assert len(by_state(trials, TrialState.COMPLETE)) == 6 and not by_state(trials, TrialState.RUNNING)


def test_running_trial_without_heartbeat_is_failed_and_retried(tmp_path):
    """A trial left RUNNING with no heartbeat at all (its worker died before the first
    beat, or an older run without heartbeats crashed) is failed and retried, not waited
    on for ever."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "heartless", trials=3, epoch_seconds=0.0)
    run_hpo("create", str(spec), "--storage", url)
    study = optuna.load_study(study_name="heartless", storage=url)
    orphan = study.ask()
    params = {"x": orphan.suggest_float("x", -4.5, 4.5), "y": orphan.suggest_float("y", -4.5, 4.5)}
    with sqlite3.connect(tmp_path / "study.db") as conn:
        conn.execute("UPDATE trials SET datetime_start = datetime('now', 'localtime', '-10 minutes')")
    run_hpo("run", str(spec), "--storage", url, "--heartbeat-interval", "2", "--grace-period", "5", timeout=120)
    trials = trials_of(url, "heartless")
    assert trials[0].state == TrialState.FAIL
    assert len(by_state(trials, TrialState.COMPLETE)) == 3 and not by_state(trials, TrialState.RUNNING)
    assert [t.params for t in trials if t.system_attrs.get("failed_trial") == 0] == [params]


TINY_LSTM = """
name = "tiny_lstm"
seeds = 1
trials = 3
[data]
name = "noisy_sine"
n_samples = 200
window = 10
[model]
family = "lstm"
[training]
max_epochs = 1
[sampler]
kind = "grid"
[pruner]
kind = "none"
[space]
# A grid of three widths in three buckets: every trial compiles a program of its own, so
# memory grows past the 1 MB limit after the first.
units = { choices = [2, 5, 9] }
"""


def test_worker_restarts_itself_when_memory_grows(tmp_path):
    """TensorFlow keeps memory per model; a worker past its growth limit re-executes
    itself between trials (same process) and finishes the budget."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    (tmp_path / "tiny.toml").write_text(TINY_LSTM)
    run_hpo("create", str(tmp_path / "tiny.toml"), "--storage", url)
    result = run_hpo("worker", "--storage", url, "--study-name", "tiny_lstm", "--max-memory-growth", "1",
                     timeout=300)
    assert "restarting to release it" in result.stdout
    assert re.search(r"worker \d+ done", result.stdout), result.stdout
    trials = trials_of(url, "tiny_lstm")
    assert len(by_state(trials, TrialState.COMPLETE)) == 3 == len(trials)


def test_bench_workers_memory_measures_a_worker_on_a_database_named_from_the_callers_folder(tmp_path):
    # A relative `sqlite:///` names a file in the folder the command runs from; the measured
    # worker used to run from the package's folder, found no study and measured nothing.
    result = run_hpo("bench-workers", "memory", "sine_lstm", "--trials", "3", "--seeds", "1", "--max-epochs", "1",
                     "--storage", "sqlite:///rel.db", cwd=tmp_path)
    assert re.search(r"after +1 trial: RSS \d+ MB", result.stdout), result.stdout
    assert len(trials_of(f"sqlite:///{tmp_path / 'rel.db'}", None)) == 3


def test_bench_workers_storage_runs_through_the_real_command(tmp_path):
    result = run_hpo("bench-workers", "storage", "--storage", f"sqlite:///{tmp_path / 'b.db'}", "--trials", "3")
    assert "plain optuna" in result.stdout and "hpo worker" in result.stdout and "ratio" in result.stdout


def test_a_signal_that_lands_in_a_del_is_not_lost():
    """A SIGTERM delivered while Python runs a `__del__` (as TensorFlow's garbage collector
    of concrete functions does) used to raise from the handler there, where Python
    discards it ("Exception ignored in ..."): the worker ran on. It must be kept."""
    from hpo.study.signals import Interrupted, check_stop, record_signals, stop_requested

    class SignalsInDel:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes, still inside __del__
                pass

    restore = record_signals()
    try:
        SignalsInDel()
        assert stop_requested()
        with pytest.raises(Interrupted, match="SIGTERM"):
            check_stop()
    finally:
        restore()


def test_memory_restarts_and_top_ups_propose_the_same_trials_as_a_straight_run(tmp_path):
    """A fixed-seed single-process run proposes the same params whether it restarted
    itself for memory, was stopped and topped up, or ran straight through; a restarted
    run prints one header and a summary of the whole run."""
    def params(db):
        return [t.params for t in trials_of(f"sqlite:///{db}", "beale")]

    run_hpo("run", "beale", "--trials", "14", "--storage", f"sqlite:///{tmp_path / 'straight.db'}")
    out = run_hpo("run", "beale", "--trials", "14", "--max-memory-growth", "0.0001",
                  "--storage", f"sqlite:///{tmp_path / 'restarted.db'}").stdout
    assert out.count("restarting to release it") >= 2 and out.count("study beale (") == 1
    assert re.search(r"done in [\d.]+ s: (\d+) complete, (\d+) pruned, 0 failed", out)
    done = re.search(r"done in [\d.]+ s: (\d+) complete, (\d+) pruned", out)
    assert int(done.group(1)) + int(done.group(2)) == 14
    run_hpo("run", "beale", "--trials", "5", "--storage", f"sqlite:///{tmp_path / 'topped.db'}")
    run_hpo("run", "beale", "--trials", "14", "--storage", f"sqlite:///{tmp_path / 'topped.db'}")
    straight = params(tmp_path / "straight.db")
    assert len(straight) == 14
    assert params(tmp_path / "restarted.db") == straight
    assert params(tmp_path / "topped.db") == straight


def test_only_the_tensorflow_backend_restarts_for_memory_by_default(monkeypatch):
    # TensorFlow keeps memory per fitted model; the JAX engine's caches are bounded.
    from hpo.specs import parse_spec
    from hpo.study.workers import MAX_MEMORY_GROWTH_MB, memory_growth_limit

    monkeypatch.delenv("HPO_BACKEND", raising=False)

    def spec(backend):
        training = {"backend": backend} if backend else {}
        return parse_spec({"name": "m", "data": {"name": "noisy_sine"}, "model": {"family": "lstm"},
                           "training": training})

    assert memory_growth_limit(spec("tensorflow"), None) == MAX_MEMORY_GROWTH_MB
    assert memory_growth_limit(spec("jax"), None) is None
    assert memory_growth_limit(spec(None), None) is None
    assert memory_growth_limit(spec("jax"), 5.0) == 5.0 and memory_growth_limit(spec("tensorflow"), 0.0) is None


def test_workers_do_not_each_take_most_of_a_gpu(monkeypatch):
    # Each `hpo worker` process (those hpo run starts, and those started by hand) allocates
    # GPU memory as needed, unless the user said otherwise.
    from hpo.backend import share_gpu

    for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.setenv(name, "")  # so that teardown restores what was there before
        monkeypatch.delenv(name)
    share_gpu()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    share_gpu()
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
