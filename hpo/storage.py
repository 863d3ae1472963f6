"""Storage: a URL (flag, `HPO_STORAGE`, or the default SQLite file) in, an Optuna
`RDBStorage` out, with settings that suit many workers on SQLite or PostgreSQL.
"""

from __future__ import annotations

import os

import optuna
import sqlalchemy

from hpo.errors import StorageError

DEFAULT_STORAGE = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"


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
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4, "pool_recycle": 300}


def get_storage(url: str | None = None) -> optuna.storages.RDBStorage:
    """Open (and create if needed) the study database.

    Raises:
        StorageError: The database cannot be reached or opened.
    """
    url = resolve_storage_url(url)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage {mask_url(url)}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
