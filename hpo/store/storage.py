"""Storage: a URL in, an Optuna `RDBStorage` out, with settings that suit many workers on
SQLite or PostgreSQL: heartbeats, retries through faults (`faults`), the study's admission
lock, claims on shared work, and trial counts against the budget.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import functools
import json
import os
import random
import socket
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import optuna
import sqlalchemy

from hpo.errors import OptionError, StorageError
from hpo.record import ATTR_FAIL_REASON, ATTR_INTERRUPTED
from hpo.store.faults import (DEFAULT_RETRY_SECONDS, RETRY_ENV, classify_storage_error, first_line, retry,
                              retry_storage_call)
from hpo.store.proxy import ProxyStorage
from hpo.store.urls import check_sqlite_file, engine_kwargs, mask_url, proxy_address, resolve_storage_url, sqlite_path

# Opening the storage gives up sooner, and without a "waiting" line: a mistyped URL or a
# server that is down should cost a user a few seconds and one line.
CONNECT_RETRY_SECONDS = 5.0
# A running trial records a heartbeat every HEARTBEAT_INTERVAL seconds; one silent for
# GRACE_PERIOD seconds belongs to a dead worker and is failed and retried. The grace
# period must outlast a database restart, or live trials would be taken for dead.
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 60
# A trial whose worker died is retried at most this often (a trial that kills every
# worker it runs on must not loop forever).
MAX_RETRY = 3
# Study user attribute: why a worker stopped the study (too many failures in a row).
STOP_ATTR = "hpo_stop_reason"
_LOCK_NAMESPACE = 0x68706F  # "hpo": first key of the PostgreSQL advisory lock
# A worker that finds the admission lock taken asks again after a random pause of up to
# this long, doubled at each try (a holder keeps it for a few milliseconds).
_LOCK_FIRST_PAUSE = 0.005
_LOCK_MAX_PAUSE = 1.0


def get_storage(url: str | None = None, *, heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
                grace_period: int | None = GRACE_PERIOD, retry_seconds: float | None = None,
                command: str = "worker", connections: int = 1) -> optuna.storages.RDBStorage | ProxyStorage:
    """Open (and create if needed) the study database, or a storage proxy in front of
    one (`grpc://host:port`, `hpo storage-proxy`: its heartbeat settings hold, not these).

    Trials record heartbeats; a trial whose worker died is failed after `grace_period`
    seconds and queued again with the same params. Calls that hit a dropped connection
    are retried with backoff for `retry_seconds` (default `HPO_DB_RETRY_SECONDS` or 600);
    a fault that waiting does not mend (full disk, read-only or corrupt file, ...) stops at
    once. `command` names what to run again in the message of a database that stays away;
    `connections` is how many the engine keeps open between calls (a worker needs one).

    Raises:
        OptionError: The grace period is not longer than the heartbeat interval.
        StorageError: The database cannot be reached or opened.
    """
    if heartbeat_interval and grace_period and grace_period <= heartbeat_interval:
        # Every live trial would be taken for dead between two of its heartbeats.
        raise OptionError("--grace-period", f"{grace_period} s must be longer than the heartbeat interval "
                                            f"({heartbeat_interval} s); raise it or lower --heartbeat-interval")
    url = resolve_storage_url(url)
    if retry_seconds is None:
        retry_seconds = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_SECONDS))
    if proxy_address(url) is not None:
        return ProxyStorage(url, retry_seconds=retry_seconds, connect_seconds=min(retry_seconds, CONNECT_RETRY_SECONDS))
    try:
        _use_wal(url)
        # Heartbeats and their retry callback are "experimental" in Optuna 5; we rely on them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = None
            if heartbeat_interval:
                callback = RetryLostTrial(max_retry=MAX_RETRY)
            return retry(lambda: ResilientRDBStorage(
                url, engine_kwargs=engine_kwargs(url, connections), heartbeat_interval=heartbeat_interval or None,
                grace_period=grace_period if heartbeat_interval else None, heartbeat_stale_trial_callback=callback,
                retry_seconds=retry_seconds), url, min(retry_seconds, CONNECT_RETRY_SECONDS), command, quiet=True,
                full_seconds=retry_seconds)
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, ImportError, ValueError, OSError) as e:
        fault = classify_storage_error(e)
        cause = fault[1] if fault else first_line(e)
        raise StorageError(f"cannot open storage {mask_url(url)}: {cause}") from e


class RetryLostTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Queue a lost trial (its worker died or was stopped) again with the same params.

    The copy starts with the trial's user attributes, minus why the old one was lost:
    the retry was not stopped by a SIGTERM, whatever becomes of it.
    """

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != ATTR_INTERRUPTED}
        super().__call__(study, trial)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """An `RDBStorage` whose calls survive a dropped connection or a database restart:
    each is retried with backoff until `retry_seconds` have passed.

    A write whose commit reached the database but whose answer was lost is sent again;
    for state changes the worker treats "already finished" as done.
    """

    def __init__(self, url: str, *, retry_seconds: float = DEFAULT_RETRY_SECONDS, **kwargs: Any) -> None:
        self.retry_seconds = retry_seconds
        # Called between retries; a worker sets it to raise once it was asked to stop, so
        # a SIGTERM during a long outage is not held up by the wait.
        self.check_stop: Callable[[], None] = lambda: None
        deadline = time.monotonic() + _CREATION_SECONDS
        while True:
            try:
                super().__init__(url, skip_compatibility_check=True, **kwargs)
                break
            except sqlalchemy.exc.DatabaseError as e:
                # Another process created Optuna's tables (or stamped their version) while
                # this one did: they exist now, so this one's next try finds them.
                if time.monotonic() > deadline or not _created_meanwhile(e):
                    raise
                if getattr(self, "engine", None) is not None:
                    self.engine.dispose()
                time.sleep(random.uniform(0.05, 0.5))
        if self.engine.dialect.name == "sqlite":
            sqlalchemy.event.listen(self.engine, "connect", _sqlite_sync_normal)
            self.engine.dispose()  # the connections Optuna opened so far, made without it
        self._check_schema()

    def _check_schema(self) -> None:
        """Optuna's check that the tables are of this Optuna's schema, one connection at a
        time: Optuna's own keeps a transaction open while it opens a second connection,
        and workers starting together through a small pooler (PgBouncer, two server
        connections) each held one and waited for another until the pooler gave up."""
        versions = self._version_manager
        current, head = versions.get_current_version(), versions.get_head_version()
        if current != head:
            raise StorageError(f"storage {mask_url(self.url)}: its tables have Optuna schema {current}, this Optuna "
                               f"({optuna.__version__}) needs {head}; upgrade them with: optuna storage upgrade "
                               f"--storage URL")


def _sqlite_sync_normal(connection: Any, record: Any) -> None:
    # In WAL mode (`_use_wal`), NORMAL syncs the log at checkpoints instead of at every
    # commit: a killed worker loses nothing, a power cut may lose the last commits but
    # never the file. A trial's epoch reports are commits, each ~1 ms of fsync at FULL.
    connection.execute("PRAGMA synchronous=NORMAL")


_CREATION_SECONDS = 30.0
# PostgreSQL's errors for a table created by another transaction at the same time:
# duplicate_table, duplicate_object.
_CREATED_MEANWHILE = {"42P07", "42710"}


def _created_meanwhile(e: sqlalchemy.exc.DatabaseError) -> bool:
    """Whether opening a database failed because another process was creating the same
    tables: a duplicate key (opening writes only Optuna's version rows, and PostgreSQL's
    catalog rows of a new table), a table that exists already."""
    code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    return (isinstance(e, sqlalchemy.exc.IntegrityError) or code in _CREATED_MEANWHILE
            or "already exists" in str(e.orig))


def _retried(name: str) -> Callable:
    base = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(base)
    def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry(lambda: base(self, *args, **kwargs), self.url, self.retry_seconds, check_stop=self.check_stop)

    return method


# Where a public method only hands over to a private one (`create_new_trial` to
# `_create_new_trial`, ...), the private one is retried: Optuna's cache around a study's
# storage calls those directly, and TPE reads every trial through `_get_trials`.
for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
              "get_trial_system_attrs", "get_all_studies", "_create_new_trial", "_set_trial_param",
              "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
              "get_trial", "_get_trials", "_get_best_trial_id", "_get_stale_trial_ids"):
    setattr(ResilientRDBStorage, _name, _retried(_name))


def call_once(storage: optuna.storages.RDBStorage | ProxyStorage, name: str, *args: Any) -> Any:
    """A storage call tried once, without the retries through faults (after a fault
    already met, a worker does not wait for the database again)."""
    plain = optuna.storages.GrpcStorageProxy if isinstance(storage, ProxyStorage) else optuna.storages.RDBStorage
    return getattr(plain, name)(storage, *args)


def rdb_storage(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | ProxyStorage:
    """The `RDBStorage` under a study's storage (Optuna wraps it in a cache), or its
    storage proxy."""
    return getattr(storage, "_backend", storage)


def _use_wal(url: str) -> None:
    # WAL lets readers go on while one worker writes, so local workers wait on each other
    # far less; the setting stays with the file. It needs a local disk, as SQLite does anyway.
    path = sqlite_path(url)
    if path is None:
        return
    if os.path.isfile(path):
        check_sqlite_file(path)

    # Switching wants the file to itself: processes opening a new file together are
    # refused at once ("database is locked", whatever the busy timeout), until one of
    # them has switched it.
    deadline = time.monotonic() + 60
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break  # switched, or kept where WAL cannot be (SQLite then says its mode, no error)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.1))


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage | ProxyStorage, study_id: int) -> Iterator[None]:
    """Hold the study's admission lock: one worker at a time counts the trials and starts one.

    PostgreSQL, and through a storage proxy: asked for again after a random pause while
    another worker holds it (`try_study_lock`), so a waiting worker holds no transaction:
    the holder's own queries need a second connection, which 100 workers blocked in the
    lock on a 100-connection server (or on a PgBouncer pool) would leave it without.
    SQLite: waited for in `flock` (one machine only). Letting go raises where the lock was
    lost while held (its connection dropped, `LockLost` through a proxy), unless the
    holder's own work raised first.
    """
    global _lock_wait
    asked = time.perf_counter()
    path = None if isinstance(storage, ProxyStorage) else sqlite_path(storage.url)
    if path is not None:
        release = _lock_sqlite_file(path, wait=True)
    else:
        pause = _LOCK_FIRST_PAUSE
        # Asking again is harmless (a failed ask holds nothing), so an outage is waited out.
        while (release := retry_storage_call(storage, lambda: try_study_lock(storage, study_id))) is None:
            time.sleep(random.uniform(0, pause))
            pause = min(2 * pause, _LOCK_MAX_PAUSE)
    _lock_wait += time.perf_counter() - asked
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the holder's own fault is the one to hear
            release()
        raise
    release()


def try_study_lock(storage: optuna.storages.RDBStorage | ProxyStorage,
                   study_id: int) -> Callable[[], None] | None:
    """Take the study's admission lock without waiting: the function that lets it go, or
    None while another holds it. PostgreSQL: a transaction-level advisory lock in a
    transaction of its own, let go at its commit (or by the server, if the connection
    drops); letting go raises the connection's fault where it dropped meanwhile, so the
    holder knows that its admission may have overlapped another's. SQLite: an exclusive
    `flock` on `<file>.hpo-lock` beside the database. Through a storage proxy: the
    proxy's (`ProxyStorage.try_study_lock`). Other backends: a lock within this process
    only."""
    if isinstance(storage, ProxyStorage):
        return storage.try_study_lock(study_id)
    path = sqlite_path(storage.url)
    if path is not None:
        return _lock_sqlite_file(path, wait=False)
    if sqlalchemy.engine.make_url(storage.url).get_backend_name() != "postgresql":
        return _local_lock.release if _local_lock.acquire(blocking=False) else None
    conn = storage.engine.connect()
    try:
        transaction = conn.begin()
        held = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:ns, :sid)"),
                            {"ns": _LOCK_NAMESPACE, "sid": study_id}).scalar()
    except BaseException:
        conn.close()
        raise

    if not held:
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
            transaction.rollback()
        conn.close()
        return None

    def unlock_database() -> None:
        try:
            transaction.commit()
        finally:
            conn.close()
    return unlock_database


def _lock_sqlite_file(path: str, wait: bool) -> Callable[[], None] | None:
    """An exclusive `flock` on `<file>.hpo-lock` beside a SQLite database, waited for or
    not (None while another process holds it): the function that lets it go."""
    f = open(f"{path}.hpo-lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as e:
        f.close()
        if isinstance(e, BlockingIOError):
            return None
        raise

    def unlock_file() -> None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
    return unlock_file


_local_lock = threading.Lock()
# Seconds this process waited for `study_lock` (on PostgreSQL including the connection it takes).
_lock_wait = 0.0


def lock_wait_seconds() -> float:
    """Seconds this process has spent waiting for study admission locks (`hpo bench-workers scale`)."""
    return _lock_wait


def write_trial_user_attrs(storage: optuna.storages.RDBStorage | ProxyStorage, trial_id: int, attrs: dict[str, Any],
                           running_only: bool = False) -> None:
    """Write user attributes on a trial, finished or not, all in one transaction (with
    `running_only`, only while it runs, as Optuna's `set_trial_user_attr` would).

    Optuna refuses `set_trial_user_attr` once a trial has finished, yet what is learnt
    about a trial later (its confirmation on fresh seeds, seeds added while it was the
    incumbent) belongs on that trial: readers, views and the dashboard look there. So the
    rows go into Optuna's own `trial_user_attributes` table directly. A process's Optuna
    cache keeps a finished trial as it first saw it: read such attributes back from the
    `RDBStorage` itself (`rdb_storage(...).get_trial_user_attrs`), not through a study.

    Raises:
        UpdateFinishedTrialError: With `running_only`, the trial has finished (another
            worker took it for dead).
    """
    if isinstance(storage, ProxyStorage):
        storage.call("write_trial_user_attrs", trial_id=trial_id, attrs=attrs, running_only=running_only)
        return
    if not hasattr(storage, "engine"):
        # Another Optuna storage (in memory, a journal): its own calls, on a running trial.
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return

    def write() -> None:
        with storage.engine.begin() as conn:
            if running_only:
                # The trial's row held until commit (PostgreSQL; SQLite writes one at a time).
                lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
                state = conn.execute(sqlalchemy.text(f"SELECT state FROM trials WHERE trial_id = :t{lock}"),
                                     {"t": trial_id}).scalar()
                if getattr(state, "name", state) != "RUNNING":
                    raise optuna.exceptions.UpdateFinishedTrialError(
                        f"trial {trial_id} has finished ({getattr(state, 'name', state)}): its record is not written")
            for key, value in attrs.items():
                conn.execute(sqlalchemy.text("DELETE FROM trial_user_attributes WHERE trial_id = :t AND key = :k"),
                             {"t": trial_id, "k": key})
                conn.execute(sqlalchemy.text("INSERT INTO trial_user_attributes (trial_id, key, value_json) "
                                             "VALUES (:t, :k, :v)"), {"t": trial_id, "k": key, "v": json.dumps(value)})

    # One transaction that deletes before it inserts: sending it again after a lost answer is harmless.
    retry_storage_call(storage, write)


# A claim whose worker never finished its work is taken over once its process is gone (same
# host) or after this long (another host: work that takes longer is done twice, not lost).
STALE_CLAIM_SECONDS = 3600.0


def claim_work(storage: optuna.storages.RDBStorage, study_id: int, key: str,
               done: Callable[[], bool] = lambda: False) -> bool:
    """Take a piece of a study's shared work for this process: a study system attribute
    `key` set under the study's admission lock, so of several workers exactly one gets it.

    Returns False when `done()` (called under the lock) says the work is done already, or
    another live process holds the claim. Give it back with `release_claim` when the work
    may be wanted again later.
    """
    with study_lock(storage, study_id):
        if done():
            return False
        claim = study_system_attr(storage, study_id, key)
        if claim is not None and _claim_live(claim):
            return False
        storage.set_study_system_attr(study_id, key, {"by": _claimant(), "at": time.time()})
    return True


def release_claim(storage: optuna.storages.RDBStorage, study_id: int, key: str) -> None:
    """Give back this process's claim on `key` (one another process took over is left alone)."""
    with study_lock(storage, study_id):
        claim = study_system_attr(storage, study_id, key)
        if isinstance(claim, dict) and claim.get("by") == _claimant():
            storage.set_study_system_attr(study_id, key, None)


def _claimant() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def study_system_attr(storage: optuna.storages.RDBStorage | ProxyStorage, study_id: int, key: str) -> Any:
    """One study system attribute, or None. One row, not `get_study_system_attrs`: that
    reads every dashboard note of the study."""
    if isinstance(storage, ProxyStorage):
        return storage.call("study_system_attr", study_id=study_id, key=key)

    def read() -> Any:
        with storage.engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT value_json FROM study_system_attributes "
                                                "WHERE study_id = :s AND key = :k"), {"s": study_id, "k": key}).scalar()

    value = retry_storage_call(storage, read)
    return None if value is None else json.loads(value)


def _claim_live(claim: Any) -> bool:
    """A claim holds while its process runs (known on this host) and is not stale."""
    if not isinstance(claim, dict) or time.time() - float(claim.get("at", 0)) >= STALE_CLAIM_SECONDS:
        return False
    host, _, pid = str(claim.get("by", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def fail_heartless_trials(study: optuna.Study) -> None:
    """Fail, and queue again, RUNNING trials that never recorded a heartbeat and started
    more than the grace period ago: their worker died before its first beat, or they
    were left by a run without heartbeats. Optuna's stale check passes them over."""
    storage = rdb_storage(study._storage)
    if not getattr(storage, "heartbeat_interval", None):
        return
    if isinstance(storage, ProxyStorage):
        trial_ids = storage.call("heartless_trial_ids", study_id=study._study_id)
    else:
        trial_ids = heartless_trial_ids(storage, study._study_id)
    for trial_id in trial_ids:
        try:
            if storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                callback = storage.heartbeat_stale_trial_callback
                if callback is not None:
                    callback(study, storage.get_trial(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def heartless_trial_ids(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """RUNNING trials without a heartbeat that started more than the grace period ago."""
    grace = storage.grace_period or 2 * storage.heartbeat_interval
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.datetime_start FROM trials t WHERE t.study_id = :sid AND t.state = 'RUNNING' "
        "AND NOT EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)")
    def read() -> list:
        with storage.engine.connect() as conn:
            return conn.execute(query, {"sid": study_id}).all()

    rows = retry_storage_call(storage, read)
    # datetime_start is the starting process's clock (Optuna writes it), so compare with ours.
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    stale = []
    for trial_id, started in rows:
        if isinstance(started, str):
            started = datetime.datetime.fromisoformat(started)
        if started is not None and started <= cutoff:
            stale.append(trial_id)
    return stale


@dataclass(frozen=True)
class TrialCounts:
    """A study's trials as the budget sees them."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0          # failed on their own (count against the budget)
    lost: int = 0            # failed because their worker died or was stopped (do not count)
    running: int = 0
    waiting: int = 0
    stop_reason: str | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def spent(self) -> int:
        """Trials that used up budget."""
        return self.complete + self.pruned + self.failed


def count_trials(storage: optuna.storages.RDBStorage, study_id: int) -> TrialCounts:
    """Count a study's trials by state in one query (no trial is loaded).

    A failed trial counts against the budget when it carries `fail_reason` (the objective
    failed on its own); one without (its worker died or was stopped) does not.
    """
    if isinstance(storage, ProxyStorage):
        return TrialCounts(**storage.call("counts", study_id=study_id))
    query = sqlalchemy.text(
        "SELECT t.state, CASE WHEN EXISTS (SELECT 1 FROM trial_user_attributes a "
        f"WHERE a.trial_id = t.trial_id AND a.key = '{ATTR_FAIL_REASON}') THEN 1 ELSE 0 END AS own, COUNT(*) "
        "FROM trials t WHERE t.study_id = :sid GROUP BY t.state, own")
    stop = sqlalchemy.text("SELECT value_json FROM study_user_attributes WHERE study_id = :sid AND key = :key")
    def read() -> tuple[list, str | None]:
        with storage.engine.connect() as conn:
            return (conn.execute(query, {"sid": study_id}).all(),
                    conn.execute(stop, {"sid": study_id, "key": STOP_ATTR}).scalar())

    rows, stop_json = retry_storage_call(storage, read)
    counts: dict[str, int] = {}
    for state, own, n in rows:
        name = getattr(state, "name", str(state))
        if name == "FAIL":
            name = "FAIL_OWN" if own else "FAIL_LOST"
        counts[name] = counts.get(name, 0) + n
    return TrialCounts(complete=counts.get("COMPLETE", 0), pruned=counts.get("PRUNED", 0),
                       failed=counts.get("FAIL_OWN", 0), lost=counts.get("FAIL_LOST", 0),
                       running=counts.get("RUNNING", 0), waiting=counts.get("WAITING", 0),
                       stop_reason=json.loads(stop_json) if stop_json else None)
