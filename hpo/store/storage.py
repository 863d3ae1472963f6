"""Storage: a URL (flag, `HPO_STORAGE`, or the default SQLite file) in, an Optuna
`RDBStorage` out, with settings that suit many workers on SQLite or PostgreSQL.
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
import sys
import threading
import time
import warnings
from urllib.parse import quote
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import optuna
import sqlalchemy

from hpo.errors import OptionError, StorageError
from hpo.record import ATTR_FAIL_REASON, ATTR_INTERRUPTED

DEFAULT_STORAGE = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"
# How long a worker keeps retrying an unreachable database before it gives up.
RETRY_ENV = "HPO_DB_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 600.0
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


def resolve_storage_url(url: str | None = None) -> str:
    """The storage URL to use: the given one, else `HPO_STORAGE`, else `sqlite:///hpo.db`."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe to print or log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine settings for the backend the URL names."""
    if url.startswith("sqlite"):
        # Several local workers write one file: wait for the lock instead of failing.
        return {"connect_args": {"timeout": 60}}
    # pool_pre_ping replaces connections a database restart has cut before they are used.
    # A worker keeps one connection between calls and opens at most two more at once (the
    # trial it starts while holding the admission lock's; its heartbeat thread's), closed
    # again after use: N workers hold about N of the server's max_connections, not 2-6 N.
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 2, "pool_recycle": 300}
    if sqlalchemy.engine.make_url(url).get_driver_name() == "psycopg":
        # No server-side prepared statements (psycopg makes them for a query run five
        # times): a pooler in transaction mode (PgBouncer) hands each transaction to
        # any server connection, where a statement prepared on another is unknown.
        kwargs["connect_args"] = {"prepare_threshold": None}
    return kwargs


def get_storage(url: str | None = None, *, heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
                grace_period: int | None = GRACE_PERIOD, retry_seconds: float | None = None,
                command: str = "worker") -> optuna.storages.RDBStorage:
    """Open (and create if needed) the study database.

    Trials record heartbeats; a trial whose worker died is failed after `grace_period`
    seconds and queued again with the same params. Calls that hit a dropped connection
    are retried with backoff for `retry_seconds` (default `HPO_DB_RETRY_SECONDS` or 600);
    a fault that waiting does not mend (full disk, read-only or corrupt file, ...) stops at
    once. `command` names what to run again in the message of a database that stays away.

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
    try:
        _use_wal(url)
        # Heartbeats and their retry callback are "experimental" in Optuna 5; we rely on them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = None
            if heartbeat_interval:
                callback = RetryLostTrial(max_retry=MAX_RETRY)
            return _retry(lambda: ResilientRDBStorage(
                url, engine_kwargs=engine_kwargs(url), heartbeat_interval=heartbeat_interval or None,
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
        super().__init__(url, skip_compatibility_check=True, **kwargs)
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


def _retried(name: str) -> Callable:
    base = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(base)
    def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return _retry(lambda: base(self, *args, **kwargs), self.url, self.retry_seconds, check_stop=self.check_stop)

    return method


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
              "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
              "get_trial", "get_all_trials", "get_best_trial", "_get_stale_trial_ids"):
    setattr(ResilientRDBStorage, _name, _retried(_name))


def rdb_storage(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    """The `RDBStorage` under a study's storage (Optuna wraps it in a cache)."""
    return getattr(storage, "_backend", storage)


# Faults that go away by themselves (PostgreSQL SQLSTATE class 08 "connection exception",
# 57P0x "server shutting down or starting", 40001/40P01 serialization failure or deadlock,
# 53300 too many connections) and SQLite's busy lock; matched on the DBAPI error.
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "53300")
_TRANSIENT_TEXT = ("database is locked", "connection refused", "server closed the connection",
                   "terminating connection", "the database system is", "connection reset", "could not connect",
                   "connection timed out", "timeout expired", "no connection to the server",
                   "connection is closed", "connection already closed", "consuming input failed",
                   "ssl syscall error", "could not receive data", "could not send data")
# Faults that waiting does not mend: (text in the DBAPI message or SQLSTATE prefix, what to do).
_PERMANENT = (
    ("database or disk is full", "the disk is full; free space and run again"),
    ("no space left on device", "the disk is full; free space and run again"),
    ("53100", "the database server's disk is full; free space and run again"),
    ("could not extend file", "the database server's disk is full; free space and run again"),
    ("readonly database", "the database file or its folder is read-only; make both writable"),
    ("read-only", "the database is read-only; use a writable one"),
    ("file is not a database", "the file is not a SQLite database; pass --storage with a study database"),
    ("database disk image is malformed", "the SQLite file is corrupt; restore it from a copy"),
    ("disk i/o error", "the disk failed to read or write; check the disk and run again"),
    ("unable to open database file", "check the path and its folder's permissions"),
    ("permission denied", "give this user access to the database"),
    ("42501", "give this user access to the database"),
    ("password authentication failed", "check the user and password in the URL"),
    ("does not exist", "check the database name in the URL, or create it"),
)


def classify_storage_error(e: BaseException) -> tuple[str, str] | None:
    """Tell a database fault that goes away by itself from one that does not.

    Returns:
        ("transient", cause) for a dropped or refused connection, a database restarting,
        SQLite's busy lock (worth waiting for); ("permanent", cause and fix) for a full
        disk, a read-only, corrupt or inaccessible database, a constraint violation
        (stop at once); None when `e` is not a database fault at all.
    """
    if not isinstance(e, (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, optuna.exceptions.StorageInternalError)) \
            and type(e).__module__.split(".")[0] not in ("psycopg", "psycopg2"):
        return None  # e.g. Optuna's DuplicatedStudyError, raised from an IntegrityError on purpose
    chain = _error_chain(e)
    dbapi = [c for c in chain if isinstance(c, (sqlite3.Error, sqlalchemy.exc.DBAPIError))
             or type(c).__module__.split(".")[0] in ("psycopg", "psycopg2")]
    if not dbapi:
        return None
    root = next((c for c in chain if isinstance(c, sqlite3.Error) or type(c).__module__.split(".")[0]
                 in ("psycopg", "psycopg2")), dbapi[-1])
    cause = first_line(root)
    sqlstate = str(getattr(root, "sqlstate", None) or getattr(root, "pgcode", None) or "")
    text = f"{cause} {sqlstate}".lower()
    for needle, fix in _PERMANENT:
        if needle in text or (needle[0].isdigit() and sqlstate.startswith(needle)):
            return "permanent", f"{cause}: {fix}"
    if any(isinstance(c, (sqlite3.IntegrityError, sqlalchemy.exc.IntegrityError)) for c in chain) \
            or sqlstate.startswith("23"):
        return "permanent", f"{cause}: a constraint was violated; the database holds something hpo did not write"
    if _server_full(root):
        return "transient", (f"{cause} (each worker holds about one of the server's max_connections: raise it, or "
                             "put PgBouncer in transaction mode in front; README, 'How many workers a PostgreSQL "
                             "carries')")
    if (sqlstate.startswith(_TRANSIENT_SQLSTATES) or any(t in text for t in _TRANSIENT_TEXT)
            or any(isinstance(c, sqlalchemy.exc.DBAPIError) and c.connection_invalidated for c in chain)):
        return "transient", cause
    if any(isinstance(c, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) for c in chain) \
            and not any(isinstance(c, sqlite3.Error) for c in chain):
        # A server-side operational fault we do not know: most are a server going away.
        return "transient", cause
    return "permanent", cause


def _server_full(e: BaseException) -> bool:
    """Whether the fault is a PostgreSQL server refusing a connection because it has as
    many clients as `max_connections` allows."""
    return any(str(getattr(c, "sqlstate", "") or "") == "53300" or "too many clients" in first_line(c).lower()
               for c in _error_chain(e))


def database_fault(e: BaseException) -> tuple[str, str] | None:
    """`classify_storage_error` of the first database error in `e`'s chain of causes,
    whatever wraps it (pandas, Optuna): for the command line's last line of defence."""
    for c in _error_chain(e):
        fault = classify_storage_error(c)
        if fault is not None:
            return fault
    return None


def is_connection_error(e: BaseException) -> bool:
    """True for faults that go away by themselves (see `classify_storage_error`)."""
    kind = classify_storage_error(e)
    return kind is not None and kind[0] == "transient"


def _error_chain(e: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and all(cur is not c for c in chain):
        chain.append(cur)
        orig = getattr(cur, "orig", None)
        cur = orig if isinstance(orig, BaseException) and all(orig is not c for c in chain) else (
            cur.__cause__ or cur.__context__)
    return chain


_outage_lock = threading.Lock()


def _retry(call: Callable[[], Any], url: str, retry_seconds: float, command: str = "worker",
           check_stop: Callable[[], None] = lambda: None, quiet: bool = False,
           full_seconds: float | None = None) -> Any:
    """`call()`, again after each transient database fault until `retry_seconds` have
    passed (`full_seconds`, and saying so, for a server that has no free connection: it
    answers, and a slot frees when another client leaves); a permanent fault raises at
    once, naming its cause."""
    started = time.monotonic()
    deadline = started + retry_seconds
    delay = 0.2
    warned = False
    while True:
        try:
            result = call()
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a transient database fault
            fault = classify_storage_error(e)
            if fault is None:
                raise
            kind, cause = fault
            if kind == "permanent":
                raise StorageError(f"storage {mask_url(url)}: {cause}") from e
            if full_seconds is not None and _server_full(e):
                retry_seconds, deadline, quiet = full_seconds, started + full_seconds, False
            if time.monotonic() + delay > deadline:
                raise StorageError(f"storage {mask_url(url)} unreachable for {retry_seconds:.0f} s: "
                                   f"{cause}; check the database and run hpo {command} again") from e
            if not warned and not quiet:
                with _outage_lock:
                    waiting = "a free connection" if _server_full(e) else "the database to come back"
                    print(f"storage {mask_url(url)}: {cause}; waiting for {waiting} "
                          f"(up to {retry_seconds:.0f} s)", file=sys.stderr, flush=True)
            warned = True
            time.sleep(delay)
            check_stop()
            delay = min(delay * 2, 5.0)
            continue
        if warned and not quiet:
            print(f"storage {mask_url(url)}: reachable again", file=sys.stderr, flush=True)
        return result


def retry_storage_call(storage: optuna.storages.BaseStorage, call: Callable[[], Any]) -> Any:
    """Run `call` (several storage round trips) again from the start after a connection fault."""
    url = getattr(storage, "url", "")
    return _retry(call, url, getattr(storage, "retry_seconds", DEFAULT_RETRY_SECONDS),
                  check_stop=getattr(storage, "check_stop", lambda: None))


def _use_wal(url: str) -> None:
    # WAL lets readers go on while one worker writes, so local workers wait on each other
    # far less; the setting stays with the file. It needs a local disk, as SQLite does anyway.
    path = sqlite_path(url)
    if path is None:
        return
    if os.path.isfile(path):
        check_sqlite_file(path)

    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")


def sqlite_path(url: str) -> str | None:
    """The file a SQLite URL names, or None (another backend, or in memory)."""
    u = sqlalchemy.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return u.database


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_id: int) -> Iterator[None]:
    """Hold the study's admission lock: one worker at a time counts the trials and starts one.

    PostgreSQL: a transaction-level advisory lock (released on commit, or by the server if
    the connection drops), asked for again after a random pause while another worker
    holds it, so a waiting worker holds no transaction: the holder's own queries need a
    second connection, which 100 workers blocked in the lock on a 100-connection server
    (or on a PgBouncer pool) would leave it without. SQLite: an exclusive `flock` on
    `<file>.hpo-lock` beside the database (SQLite is one machine only). Other backends: a
    lock within this process only.
    """
    global _lock_wait
    url = storage.url
    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    asked = time.perf_counter()
    if backend == "postgresql":
        pause = _LOCK_FIRST_PAUSE
        while True:
            with storage.engine.begin() as conn:
                if conn.execute(sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:ns, :sid)"),
                                {"ns": _LOCK_NAMESPACE, "sid": study_id}).scalar():
                    _lock_wait += time.perf_counter() - asked
                    yield
                    return
            time.sleep(random.uniform(0, pause))
            pause = min(2 * pause, _LOCK_MAX_PAUSE)
    path = sqlite_path(url)
    if path is not None:
        with open(f"{path}.hpo-lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _lock_wait += time.perf_counter() - asked
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    with _local_lock:
        yield


_local_lock = threading.Lock()
# Seconds this process waited for `study_lock` (on PostgreSQL including the connection it takes).
_lock_wait = 0.0


def lock_wait_seconds() -> float:
    """Seconds this process has spent waiting for study admission locks (`hpo bench-workers scale`)."""
    return _lock_wait


def write_trial_user_attrs(storage: optuna.storages.RDBStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    """Write user attributes on a trial, finished or not, all in one transaction.

    Optuna refuses `set_trial_user_attr` once a trial has finished, yet what is learnt
    about a trial later (its confirmation on fresh seeds, seeds added while it was the
    incumbent) belongs on that trial: readers, views and the dashboard look there. So the
    rows go into Optuna's own `trial_user_attributes` table directly. A process's Optuna
    cache keeps a finished trial as it first saw it: read such attributes back from the
    `RDBStorage` itself (`rdb_storage(...).get_trial_user_attrs`), not through a study.
    """
    def write() -> None:
        with storage.engine.begin() as conn:
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
        claim = _study_system_attr(storage, study_id, key)
        if claim is not None and _claim_live(claim):
            return False
        storage.set_study_system_attr(study_id, key, {"by": _claimant(), "at": time.time()})
    return True


def release_claim(storage: optuna.storages.RDBStorage, study_id: int, key: str) -> None:
    """Give back this process's claim on `key` (one another process took over is left alone)."""
    with study_lock(storage, study_id):
        claim = _study_system_attr(storage, study_id, key)
        if isinstance(claim, dict) and claim.get("by") == _claimant():
            storage.set_study_system_attr(study_id, key, None)


def _claimant() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _study_system_attr(storage: optuna.storages.RDBStorage, study_id: int, key: str) -> Any:
    # One row, not `get_study_system_attrs`: that reads every dashboard note of the study.
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
    grace = storage.grace_period or 2 * storage.heartbeat_interval
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.datetime_start FROM trials t WHERE t.study_id = :sid AND t.state = 'RUNNING' "
        "AND NOT EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)")
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"sid": study._study_id}).all()
    # datetime_start is the starting worker's clock (Optuna writes it), so compare with ours.
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    for trial_id, started in rows:
        if isinstance(started, str):
            started = datetime.datetime.fromisoformat(started)
        if started is None or started > cutoff:
            continue
        try:
            if storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                callback = storage.heartbeat_stale_trial_callback
                if callback is not None:
                    callback(study, storage.get_trial(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


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
    query = sqlalchemy.text(
        "SELECT t.state, CASE WHEN EXISTS (SELECT 1 FROM trial_user_attributes a "
        f"WHERE a.trial_id = t.trial_id AND a.key = '{ATTR_FAIL_REASON}') THEN 1 ELSE 0 END AS own, COUNT(*) "
        "FROM trials t WHERE t.study_id = :sid GROUP BY t.state, own")
    stop = sqlalchemy.text("SELECT value_json FROM study_user_attributes WHERE study_id = :sid AND key = :key")
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"sid": study_id}).all()
        stop_json = conn.execute(stop, {"sid": study_id, "key": STOP_ATTR}).scalar()
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


def existing_sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL, which must exist (a read must not create an empty
    database); None for other backends.

    Raises:
        StorageError: The URL is malformed, or names a SQLite file that does not exist.
    """
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as e:
        raise StorageError(f"not a storage URL: {url!r}; expected e.g. sqlite:///hpo.db") from e
    if parsed.get_backend_name() != "sqlite":
        return None
    path = parsed.database or ""
    if not path or path == ":memory:" or not os.path.isfile(path):
        raise StorageError(f"no study database at {path or url!r}; run a study first (hpo run ...) or pass --storage")
    check_sqlite_file(path)
    return path


def check_sqlite_file(path: str) -> None:
    """Refuse a file that exists but is not a SQLite database (SQLite itself only says so
    on the first query, deep inside whichever command runs it).

    SQLite reads the header, not we: closing any descriptor of a database file this
    process has open through SQLite drops SQLite's POSIX locks on it, which corrupts the
    database when other processes write it. Read-only, so nothing is created or checkpointed.

    Raises:
        StorageError: Naming the file.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        if "file is not a database" in str(e):
            raise StorageError(f"{path} is not a SQLite database (file is not a database); "
                               "pass --storage with a study database") from e
        # Anything else (a WAL file we may not open read-only, ...) is met, and named, later.


def first_line(e: BaseException) -> str:
    """The first line of an error's message: the database's own, not that of a wrapper
    (SQLAlchemy's, or Optuna's "invalid data in the commit" around any failed commit)."""
    chain = _error_chain(e)
    root = next((c for c in chain if isinstance(c, sqlite3.Error)
                 or type(c).__module__.split(".")[0] in ("psycopg", "psycopg2")), chain[-1])
    text = str(root).strip()
    return (text.splitlines() or [type(e).__name__])[0]
