"""The storage proxy, for real: an `hpo storage-proxy` process on a SQLite file and on a
PostgreSQL database, `hpo worker` processes on `grpc://` in front of it, a worker
SIGKILLed mid-trial, the proxy itself restarted mid-run, and the bad URLs a user types."""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.store import proxy as proxy_module
from hpo.store.faults import LockLost
from hpo.store.proxy import LOCK_LEASE_SECONDS, _Service, serve_proxy
from hpo.store.storage import get_storage, study_lock, write_trial_user_attrs
from tests.conftest import ROOT, run_hpo, wait_until
from tests.study.test_workers import by_state, start_hpo, stop_mid_trial, trials_of, wait_for_line, write_study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(url: str, port: int, *args: str) -> tuple[subprocess.Popen, str]:
    proc = start_hpo("storage-proxy", "--storage", url, "--port", str(port), *args)
    line = wait_for_line(proc, "grpc://")
    assert f"grpc://127.0.0.1:{port}" in line, line
    return proc, f"grpc://127.0.0.1:{port}"


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_workers_share_a_study_through_the_proxy_with_an_exact_budget(storage_url, tmp_path):
    """Four workers on `grpc://`, none with a database connection of its own: exactly the
    budget runs, nothing is left RUNNING or given back, each trial names its worker, and
    the reports read the database itself (the proxy's URL gets one line saying so)."""
    spec = write_study(tmp_path, "proxied", trials=24, epoch_seconds=0.0)
    run_hpo("create", str(spec), "--storage", storage_url)
    proxy, grpc_url = start_proxy(storage_url, free_port())
    workers = [start_hpo("worker", "--storage", grpc_url, "--study-name", "proxied", "--worker-index", str(i))
               for i in range(4)]
    try:
        for w in workers:
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, out + err
            assert "given back" in out and ", 0 given back" in out, out
    finally:
        stop(*workers, proxy)
    trials = trials_of(storage_url, "proxied")
    assert len(trials) == 24 and len(by_state(trials, TrialState.COMPLETE)) == 24
    assert len({t.user_attrs["worker"] for t in trials}) > 1
    refused = run_hpo("report", "--storage", grpc_url, check=False)
    assert refused.returncode != 0 and "is a storage proxy" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert "proxied" in run_hpo("report", "--storage", storage_url).stdout


def test_workers_of_two_proxies_and_one_on_the_database_share_one_budget(postgres, tmp_path):
    """Two proxies in front of one PostgreSQL study and a worker straight on it: the
    admission lock is the database's, so the budget comes out exact (that each kind waits
    for the other's lock: `test_the_admission_lock_is_one_holders_...`)."""
    url = postgres.create_database()
    spec = write_study(tmp_path, "mixed", trials=30, epoch_seconds=0.05)
    run_hpo("create", str(spec), "--storage", url)
    (first, first_url), (second, second_url) = (start_proxy(url, free_port()) for _ in range(2))
    workers = [start_hpo("worker", "--storage", where, "--study-name", "mixed", "--worker-index", str(i))
               for i, where in enumerate((first_url, second_url, url))]
    try:
        for w in workers:
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, out + err
    finally:
        stop(*workers, first, second)
    trials = trials_of(url, "mixed")
    assert len(trials) == 30 and len(by_state(trials, TrialState.COMPLETE)) == 30
    ran = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert ran <= {str(w.pid) for w in workers} and len(ran) >= 2, ran  # a worker started late may find none left


def test_a_sigkilled_worker_behind_the_proxy_has_its_trial_retried(tmp_path):
    """Heartbeats go through the proxy: a worker SIGKILLed mid-trial is seen dead after
    the proxy's grace period, and its trial is failed and run again with the same params."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "killed", trials=8)
    run_hpo("create", str(spec), "--storage", url)
    proxy, grpc_url = start_proxy(url, free_port(), "--heartbeat-interval", "1", "--grace-period", "3")
    workers = [start_hpo("worker", "--storage", grpc_url, "--study-name", "killed")]
    try:
        killed_number = stop_mid_trial(workers[0], url)
        workers[0].kill()
        workers[0].wait()
        workers += [start_hpo("worker", "--storage", grpc_url, "--study-name", "killed") for _ in range(2)]
        for w in workers[1:]:
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, out + err
    finally:
        stop(*workers, proxy)
    trials = trials_of(url, "killed")
    assert len(by_state(trials, TrialState.COMPLETE)) == 8 and not by_state(trials, TrialState.RUNNING)
    killed = by_state(trials, TrialState.FAIL)
    assert [t.number for t in killed] == [killed_number] and "fail_reason" not in killed[0].user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1 and retries[0].params == killed[0].params


def test_workers_wait_for_a_restarted_proxy_and_finish_the_budget(tmp_path):
    """The proxy is stopped and started again on its port while two workers run: each
    says it is waiting, carries on once it answers, and the budget ends exact."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "restart", trials=24, epoch_seconds=0.1)
    run_hpo("create", str(spec), "--storage", url)
    port = free_port()
    proxy, grpc_url = start_proxy(url, port)
    workers = [start_hpo("worker", "--storage", grpc_url, "--study-name", "restart") for _ in range(2)]
    errors: list[str] = []
    readers = [threading.Thread(target=lambda w=w: errors.extend(w.stderr), daemon=True) for w in workers]
    for r in readers:
        r.start()
    try:
        wait_for_line(workers[0], "trial ")
        proxy.terminate()
        proxy.wait(timeout=60)
        wait_until(lambda: any("waiting for" in line for line in errors), "a worker to meet the outage")
        proxy, _ = start_proxy(url, port)
        for w in workers:
            w.wait(timeout=300)
            assert w.returncode == 0, "".join(errors)
        for r in readers:
            r.join(timeout=60)
    finally:
        stop(*workers, proxy)
    err = "".join(errors)
    assert "not answering" in err and "reachable again" in err, err
    trials = trials_of(url, "restart")
    finished = by_state(trials, TrialState.COMPLETE)
    assert len(finished) == 24 and not by_state(trials, TrialState.RUNNING), [
        (t.number, t.state.name, t.user_attrs.get("fail_reason") or t.user_attrs.get("interrupted")) for t in trials]


def test_a_trial_begun_before_the_proxy_restarted_takes_its_params_after(tmp_path):
    """A restarted proxy's trial cache (Optuna's) knows no trial created before it started.
    A worker sampling such a trial when the proxy came back once got a bare KeyError, and
    the trial was failed as if by its own fault, spending the budget; its params must be
    set as any other's."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "resumed", trials=2)
    run_hpo("create", str(spec), "--storage", url)
    port = free_port()
    proxy, grpc_url = start_proxy(url, port)
    try:
        study = optuna.load_study(study_name="resumed", storage=get_storage(grpc_url))
        trial = study.ask()
        x = trial.suggest_float("x", -4.5, 4.5)
        stop(proxy)
        proxy, _ = start_proxy(url, port)
        # Sampled from the trials the first proxy gave (Optuna reads them once a trial),
        # then set through the second.
        y = trial.suggest_float("y", -4.5, 4.5)
        study.tell(trial, x + y)
    finally:
        stop(proxy)
    [stored] = trials_of(url, "resumed")
    assert stored.state == TrialState.COMPLETE and stored.params == {"x": x, "y": y}


@pytest.mark.parametrize("args, says", [
    (["worker", "--storage", "grpc://localhost", "--study-name", "x"], "expected grpc://HOST:PORT"),
    (["worker", "--storage", "grpc://127.0.0.1:{port}", "--study-name", "x"], "cannot reach the storage proxy"),
    (["worker", "--storage", "grpc://127.0.0.1:{port}", "--study-name", "x", "--grace-period", "30"],
     "pass it to hpo storage-proxy"),
    (["storage-proxy", "--storage", "grpc://127.0.0.1:{port}"], "pass the database's URL"),
    (["sql", "SELECT 1", "--storage", "grpc://127.0.0.1:{port}"], "is a storage proxy"),
    (["run", "beale", "--storage", "grpc://127.0.0.1:{port}", "--heartbeat-interval", "5"],
     "pass it to hpo storage-proxy"),
    (["bench-workers", "scale", "--storage", "grpc://127.0.0.1:{port}", "--workers", "2"], "--proxy puts a proxy"),
])
def test_a_wrong_proxy_url_is_one_line(args, says):
    port = str(free_port())
    result = run_hpo(*[a.replace("{port}", port) for a in args], check=False, timeout=120)
    assert result.returncode != 0 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_proxy_port_taken_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_hpo("storage-proxy", "--storage", f"sqlite:///{tmp_path / 'p.db'}", "--port", str(port),
                         check=False, timeout=120)
    assert result.returncode != 0 and "cannot listen" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_admission_lock_is_one_holders_until_released_or_its_lease_runs_out(storage_url):
    """The proxy's lock on a real storage: a second holder is refused while the first
    holds it, gets it once released, and takes over a holder that never came back; the
    proxy holds the database's own lock meanwhile, so a worker straight on the database
    (or behind another proxy) waits for it, and gets it once a dead holder's lease runs out."""
    from hpo.store.storage import try_study_lock

    clock = [0.0]
    storage = get_storage(storage_url)
    service, other_proxy = (_Service(get_storage(storage_url), clock=lambda: clock[0]) for _ in range(2))

    def direct_worker_gets_it(study_id: int = 1) -> bool:
        release = try_study_lock(storage, study_id)
        if release is not None:
            release()
        return release is not None

    assert service.try_lock(1, "a") and not service.try_lock(1, "b")
    assert not direct_worker_gets_it() and not other_proxy.try_lock(1, "c")
    assert service.try_lock(1, "a")  # its holder renews the lease
    service.unlock(1, "b")  # not b's to give back
    assert not service.try_lock(1, "b")
    service.unlock(1, "a")
    assert direct_worker_gets_it()
    release = try_study_lock(storage, 1)  # a worker on the database holds it: the proxy waits
    assert not service.try_lock(1, "b")
    release()
    assert service.try_lock(1, "b")
    service.unlock(1, "b")
    if storage_url.startswith("postgresql"):  # SQLite's lock is the file's, for all its studies
        assert service.try_lock(1, "a") and service.try_lock(2, "b")
        service.unlock(1, "a"), service.unlock(2, "b")
    assert service.try_lock(3, "dead")
    clock[0] = LOCK_LEASE_SECONDS - 1
    service.expire()
    assert not service.try_lock(3, "live") and not direct_worker_gets_it(3)
    clock[0] = LOCK_LEASE_SECONDS + 1
    service.expire()  # the proxy lets go of the dead holder's lock by itself
    assert direct_worker_gets_it(3) and service.try_lock(3, "live")
    service.expire(everyone=True)
    assert direct_worker_gets_it(3)
    # A holder whose lease ran out has lost the lock, and hears so: renewing does not take
    # it again, and letting go says it was lost (its worker gives its trial back).
    assert service.try_lock(4, "slow")
    clock[0] += LOCK_LEASE_SECONDS + 1
    service.expire()
    assert not service.renew(4, "slow") and not service.unlock(4, "slow")
    assert service.try_lock(4, "other") and service.renew(4, "other") and service.unlock(4, "other")


def test_a_lock_whose_database_connection_dropped_is_reported_lost(postgres):
    """PostgreSQL lets go of an advisory lock when its connection drops: the holder must
    hear it when it lets go (its admission may have overlapped another's), on a worker's
    own lock and through the proxy."""
    import sqlalchemy

    from hpo.store.storage import try_study_lock

    url = postgres.create_database()
    storage = get_storage(url)
    admin = sqlalchemy.create_engine(url)

    def drop_the_locks_connection() -> None:
        with admin.begin() as conn:
            pids = conn.execute(sqlalchemy.text("SELECT pid FROM pg_locks WHERE locktype = 'advisory'")).scalars().all()
            assert len(pids) == 1
            conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})

    release = try_study_lock(storage, 7)
    drop_the_locks_connection()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        release()
    service = _Service(get_storage(url))
    assert service.try_lock(7, "a")
    drop_the_locks_connection()
    assert not service.unlock(7, "a")
    assert service.try_lock(7, "b") and service.unlock(7, "b")
    with proxy_in_this_process(url) as grpc_url:
        with pytest.raises(LockLost, match="lost"):
            with study_lock(get_storage(grpc_url), 7):
                drop_the_locks_connection()
    admin.dispose()


def test_scale_drill_through_the_proxy_holds_few_connections(postgres):
    """`hpo bench-workers scale --proxy`: sixteen workers through one proxy on PostgreSQL,
    the budget exact, and the server never saw more connections than the proxy keeps
    (4, and 2 more at busy moments) and the drill's own engine (1, and 2 more)."""
    url = postgres.create_database()
    result = run_hpo("bench-workers", "scale", "--storage", url, "--workers", "16", "--trials-per-worker", "1",
                     "--proxy", timeout=600)
    line = result.stdout.strip().splitlines()[-1]
    assert "via a storage proxy" in line and "budget 100/100 exact, 0 running, 0 workers failed" in line, line
    peak = int(line.split("peak ")[1].split()[0])
    assert 1 <= peak <= (4 + 2) + (1 + 2) < 16, line


def test_optuna_alone_reads_a_study_through_the_proxy(tmp_path):
    """What the proxy serves is Optuna's own gRPC storage: a plain `GrpcStorageProxy`
    loads the study hpo's workers wrote."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_study(tmp_path, "plain", trials=3, epoch_seconds=0.0)
    run_hpo("run", str(spec), "--storage", url)
    port = free_port()
    proxy, _ = start_proxy(url, port)
    try:
        code = ("import optuna, warnings; warnings.simplefilter('ignore'); "
                f"s = optuna.storages.GrpcStorageProxy(host='127.0.0.1', port={port}); "
                "print(len(optuna.load_study(study_name='plain', storage=s).trials))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        stop(proxy)
    assert out.stdout.strip() == "3", out.stderr
    assert len(optuna.load_study(study_name="plain", storage=url).trials) == 3


@contextlib.contextmanager
def proxy_in_this_process(url: str):
    """`serve_proxy` on a thread of the test (its grpc:// URL), stopped at the end."""
    ports: queue.Queue[int] = queue.Queue()
    stop_event = threading.Event()
    server = threading.Thread(target=serve_proxy, args=(get_storage(url), "127.0.0.1", 0),
                              kwargs={"ready": ports.put, "stop": stop_event}, daemon=True)
    server.start()
    try:
        yield f"grpc://127.0.0.1:{ports.get(timeout=60)}"
    finally:
        stop_event.set()
        server.join(timeout=60)


def test_the_admission_lock_is_renewed_while_its_holder_works(tmp_path, monkeypatch):
    """A holder slower than the lease (a database that takes its time) keeps the lock:
    nobody else gets it until it lets go."""
    monkeypatch.setattr(proxy_module, "LOCK_LEASE_SECONDS", 0.6)
    with proxy_in_this_process(f"sqlite:///{tmp_path / 'p.db'}") as url:
        holder, other = get_storage(url), get_storage(url)
        with study_lock(holder, 1):
            deadline = time.monotonic() + 2.0  # more than three leases
            while time.monotonic() < deadline:
                assert not other.call("try_lock", study_id=1, holder="other")
                time.sleep(0.1)
        assert other.call("try_lock", study_id=1, holder="other")


def test_a_finished_trial_takes_no_record_meant_for_a_running_one(storage_url, tmp_path):
    """A trial another worker failed as dead gets no record from the worker that still
    ran it (as Optuna's own set_trial_user_attr refuses), directly and through the proxy;
    a confirmation (meant for finished trials) is written, and the proxy's Optuna service
    shows it to a new client."""
    study = optuna.create_study(study_name="s", storage=storage_url)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    storage = get_storage(storage_url)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        write_trial_user_attrs(storage, trial._trial_id, {"mean": 1.0}, running_only=True)
    with proxy_in_this_process(storage_url) as url:
        proxied = get_storage(url)
        assert proxied.get_all_trials(study._study_id)[0].state == TrialState.FAIL  # now in the proxy's cache
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            write_trial_user_attrs(proxied, trial._trial_id, {"mean": 1.0}, running_only=True)
        write_trial_user_attrs(proxied, trial._trial_id, {"confirm_mean": 2.0})
        fresh = get_storage(url)
        assert fresh.get_all_trials(study._study_id)[0].user_attrs == {"confirm_mean": 2.0}
        assert fresh.get_trial(trial._trial_id).user_attrs == {"confirm_mean": 2.0}
    assert storage.get_trial_user_attrs(trial._trial_id) == {"confirm_mean": 2.0}


def test_a_record_larger_than_grpcs_default_message_goes_through(tmp_path):
    """A trial's record is sent whole: 300 seeds' curves of 1,000 epochs (about 7 MB of
    JSON, over gRPC's default 4 MB)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    trial = study.ask()
    curves = [{"loss": [0.123456789] * 1000, "val_loss": [0.987654321] * 1000} for _ in range(300)]
    with proxy_in_this_process(url) as proxy_url:
        write_trial_user_attrs(get_storage(proxy_url), trial._trial_id, {"curves": curves}, running_only=True)
        assert get_storage(proxy_url).get_trial(trial._trial_id).user_attrs["curves"] == curves


def test_workers_behind_the_proxy_survive_a_postgresql_restart(postgres, tmp_path):
    """PostgreSQL is stopped and started again while two workers run behind the proxy:
    the proxy waits for it, the workers' calls wait in the proxy (or ask again), and the
    study ends complete with nothing lost."""
    url = postgres.create_database()
    # Trials long enough (2 s) that the workers are still at them when the server stops,
    # however slowly this test gets there under load: a finished study meets no outage.
    spec = write_study(tmp_path, "pgrestart", trials=12, epoch_seconds=0.25)
    run_hpo("create", str(spec), "--storage", url)
    proxy, grpc_url = start_proxy(url, free_port())
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(proxy.stderr), daemon=True)
    reader.start()
    workers = [start_hpo("worker", "--storage", grpc_url, "--study-name", "pgrestart") for _ in range(2)]
    try:
        wait_for_line(workers[0], "trial ")
        postgres.stop()
        wait_until(lambda: any("waiting for the database to come back" in line for line in said),
                   "the proxy to meet the outage")
        postgres.start()
        for w in workers:
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, out + err
    finally:
        stop(*workers, proxy)
        postgres.start_if_stopped()
    trials = trials_of(url, "pgrestart")
    assert len(by_state(trials, TrialState.COMPLETE)) == 12 and not by_state(trials, TrialState.RUNNING)


def test_a_proxy_gone_silent_fails_a_call_instead_of_leaving_it_waiting(tmp_path, monkeypatch):
    """A proxy that stops answering but keeps its connections open (here: SIGSTOPped; a
    machine cut off the network looks the same) is noticed by the client's pings: the
    call fails as a proxy that is away (and is retried, or given up in one line) instead
    of waiting forever."""
    import grpc
    import signal

    monkeypatch.setattr(proxy_module, "KEEPALIVE_MS", (500, 500))
    url = f"sqlite:///{tmp_path / 'p.db'}"
    # A port of its own choosing (--port 0): no other test's server can be the one answering.
    proxy = start_hpo("storage-proxy", "--storage", url, "--port", "0")
    grpc_url = re.search(r"grpc://127\.0\.0\.1:\d+", wait_for_line(proxy, "grpc://")).group(0)
    try:
        client = get_storage(grpc_url)
        assert client.call_once("hello")["optuna"] == optuna.__version__
        proxy.send_signal(signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{proxy.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                   "the proxy to be stopped")
        outcome: queue.Queue = queue.Queue()

        def call() -> None:
            try:
                outcome.put(client.call_once("hello"))
            except grpc.RpcError as e:
                outcome.put(e.code())
        threading.Thread(target=call, daemon=True).start()
        assert outcome.get(timeout=30) == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.send_signal(signal.SIGCONT)
        stop(proxy)
