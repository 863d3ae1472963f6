"""Database faults: an exception in; whether it goes away by itself (a dropped connection, a
restart, SQLite's busy lock, a full server) or not (a full disk, a read-only or corrupt file),
in one line with the fix, out; and the retry that waits out the first kind.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from typing import Any, Callable

import optuna
import sqlalchemy

from hpo.errors import StorageError
from hpo.store.urls import mask_url


# How long a worker keeps retrying an unreachable database before it gives up.
RETRY_ENV = "HPO_DB_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 600.0

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


class LockLost(Exception):
    """The study's admission lock went while a worker held it (the storage proxy lost it,
    or could not be reached to let go of it): the worker's admission may have overlapped
    another's, so its new trial is given back, as when the lock's database connection drops."""


def classify_storage_error(e: BaseException) -> tuple[str, str] | None:
    """Tell a database fault that goes away by itself from one that does not.

    Returns:
        ("transient", cause) for a dropped or refused connection, a database restarting,
        SQLite's busy lock (worth waiting for); ("permanent", cause and fix) for a full
        disk, a read-only, corrupt or inaccessible database, a constraint violation
        (stop at once); None when `e` is not a database fault at all.
    """
    if isinstance(e, LockLost):
        return "transient", str(e)
    code = _proxy_status(e)
    if code is not None:
        # A storage proxy's answer (`hpo storage-proxy`): away (stopping cancels the calls
        # in flight), or failing on its side.
        details = (e.details() or "").strip().splitlines()
        if code in ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"):
            return "transient", f"the storage proxy is not answering ({details[0] if details else code.lower()})"
        if code in ("UNKNOWN", "RESOURCE_EXHAUSTED"):
            return "permanent", f"the storage proxy failed: {details[0] if details else code}"
        return None
    if isinstance(e, sqlalchemy.exc.TimeoutError):
        # The engine's pool had no free connection in time: busy, not broken.
        return "transient", f"every database connection of this process is busy ({first_line(e)})"
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


def _proxy_status(e: BaseException) -> str | None:
    """The gRPC status name of a failed call to a storage proxy, or None."""
    if type(e).__module__.split(".")[0] != "grpc" or not callable(getattr(e, "code", None)):
        return None
    try:
        return e.code().name
    except Exception:  # noqa: BLE001 - an RpcError without a status
        return None


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


def retry(call: Callable[[], Any], url: str, retry_seconds: float, command: str = "worker",
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
                what = "storage proxy" if _proxy_status(e) else "database"
                raise StorageError(f"storage {mask_url(url)} unreachable for {retry_seconds:.0f} s: "
                                   f"{cause}; check the {what} and run hpo {command} again") from e
            if not warned and not quiet:
                with _outage_lock:
                    waiting = "a free connection" if _server_full(e) else (
                        "the storage proxy" if _proxy_status(e) else "the database") + " to come back"
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
    return retry(call, url, getattr(storage, "retry_seconds", DEFAULT_RETRY_SECONDS),
                  check_stop=getattr(storage, "check_stop", lambda: None))


def first_line(e: BaseException) -> str:
    """The first line of an error's message: the database's own, not that of a wrapper
    (SQLAlchemy's, or Optuna's "invalid data in the commit" around any failed commit)."""
    chain = _error_chain(e)
    root = next((c for c in chain if isinstance(c, sqlite3.Error)
                 or type(c).__module__.split(".")[0] in ("psycopg", "psycopg2")), chain[-1])
    text = str(root).strip()
    return (text.splitlines() or [type(e).__name__])[0]
