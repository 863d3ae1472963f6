"""Storage URLs: a URL (the flag, `HPO_STORAGE`, or the default SQLite file) in; what it names (a
SQLite file, checked before anything opens it), the URL safe to print, and the engine settings
for its backend out.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from urllib.parse import quote
from typing import Any

import sqlalchemy

from hpo.errors import OptionError, StorageError


DEFAULT_STORAGE = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"
# `grpc://host:port`: an `hpo storage-proxy` in front of the database (workers only).
PROXY_SCHEME = "grpc://"


def resolve_storage_url(url: str | None = None) -> str:
    """The storage URL to use: the given one, else `HPO_STORAGE`, else `sqlite:///hpo.db`."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def proxy_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a `grpc://host:port` URL, or None for a database URL.

    Raises:
        OptionError: A grpc URL without a host and a port.
    """
    if not url.startswith(PROXY_SCHEME):
        return None
    host, _, port = url[len(PROXY_SCHEME):].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError("--storage", f"{url!r} is not a storage proxy's URL; expected grpc://HOST:PORT, "
                                       "e.g. grpc://localhost:13000")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise OptionError("--storage", f"{url!r}: write an IPv6 address in brackets, e.g. grpc://[::1]:13000")
    return host, int(port)


def address(host: str, port: int) -> str:
    """`host:port` as gRPC takes it, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def refuse_proxy(url: str, what: str) -> None:
    """`what` (reports, SQL, the dashboard) reads the database's tables itself: it needs
    the database's URL, not a storage proxy's.

    Raises:
        StorageError: `url` names a storage proxy.
    """
    if url.startswith(PROXY_SCHEME):
        raise StorageError(f"{url} is a storage proxy, which serves workers; {what} read the database itself: "
                           "pass the database's URL (the --storage hpo storage-proxy was started with)")


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe to print or log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return url


def engine_kwargs(url: str, connections: int = 1) -> dict:
    """SQLAlchemy engine settings for the backend the URL names; a server's engine keeps
    `connections` open between calls (a worker needs one, a storage proxy a few)."""
    if url.startswith("sqlite"):
        # Several local workers write one file: wait for the lock instead of failing.
        return {"connect_args": {"timeout": 60}}
    # pool_pre_ping replaces connections a database restart has cut before they are used.
    # A worker keeps one connection between calls and opens at most two more at once (of
    # the trial it starts while holding the admission lock's, its heartbeat thread's and
    # its report thread's; a call finding all three of its connections in use waits for
    # one), closed again after use: N workers hold about N of the server's
    # max_connections, not 2-6 N.
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_size": connections, "max_overflow": 2,
                              "pool_recycle": 300}
    if sqlalchemy.engine.make_url(url).get_driver_name() == "psycopg":
        # No server-side prepared statements (psycopg makes them for a query run five
        # times): a pooler in transaction mode (PgBouncer) hands each transaction to
        # any server connection, where a statement prepared on another is unknown.
        kwargs["connect_args"] = {"prepare_threshold": None}
    return kwargs


def sqlite_path(url: str) -> str | None:
    """The file a SQLite URL names, or None (another backend, or in memory)."""
    u = sqlalchemy.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return u.database


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
