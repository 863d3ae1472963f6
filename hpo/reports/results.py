"""Results: a study database URL in, read-only SQL and pandas DataFrames out: `hpo sql`,
and the `hpo_` views per study (`trials_frame`, `seed_scores_frame`, ...) that the report
(`hpo.reports.report`) and the plots read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from urllib.parse import quote

import pandas as pd
import sqlalchemy

from hpo.errors import StorageError, StudyNotFound
from hpo.store.urls import existing_sqlite_path, refuse_proxy, resolve_storage_url
from hpo.store.views import create_views, sqlite_views_current

FORMATS = ("table", "csv", "json", "markdown")
# Pragmas that take an argument yet only read; every other pragma with an argument sets
# something and is refused.
_READING_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
})


_WRITE_REFUSED = ("readonly database", "read-only", "permission denied", "must be owner")


class ReadOnlyRefused(StorageError):
    """The database refused a statement that would write (hpo sql is read-only)."""


def connect_readonly(url: str | None = None) -> sqlalchemy.engine.Engine:
    """An engine whose connections the database itself keeps from writing.

    SQLite: the file is opened with `mode=ro` (no write, no journal) and an authorizer
    refuses ATTACH and setting pragmas, which `mode=ro` alone lets through.
    PostgreSQL: every transaction is `READ ONLY` (`default_transaction_read_only`).
    Before that the `hpo_` views are brought up to date through an ordinary connection,
    so databases made before they existed get them; a database we may not write to is
    queried as it is.

    Raises:
        StorageError: No such database, or it cannot be reached.
    """
    url = resolve_storage_url(url)
    refuse_proxy(url, "reports, plots and hpo sql")
    path = existing_sqlite_path(url)
    if path is not None:
        uri = f"file:{quote(os.path.abspath(path))}?mode=ro"

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.set_authorizer(_sqlite_authorizer)
            return conn

        # Only open a writable connection when the views need creating: closing the last
        # one checkpoints a WAL file into the database, which a read must not do.
        with contextlib.closing(connect()) as probe:
            views_current = sqlite_views_current(probe.cursor())
        if views_current is False:
            _create_views_if_allowed(url)

        return sqlalchemy.create_engine("sqlite://", creator=connect, poolclass=sqlalchemy.pool.NullPool)
    _create_views_if_allowed(url)
    # psycopg's default prepare threshold is kept: it sends each query as one statement
    # of the extended protocol, which refuses "COMMIT; SET ... READ WRITE; INSERT ...".
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    @sqlalchemy.event.listens_for(engine, "connect")
    def _read_only(dbapi_conn, _record) -> None:
        if hasattr(dbapi_conn, "read_only"):
            # psycopg begins each transaction READ ONLY: a session setting would not
            # follow the transactions that a pooler in transaction mode hands around.
            dbapi_conn.read_only = True
            return
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        dbapi_conn.commit()

    return engine


def _create_views_if_allowed(url: str) -> None:
    try:
        create_views(url)
    except StorageError as e:
        # Only a database that refuses writes to us is fine: reading it needs no views of
        # ours if it has them already, and says "no such table" plainly if not.
        if not any(phrase in str(e).lower() for phrase in _WRITE_REFUSED):
            raise


def _sqlite_authorizer(action: int, arg1, arg2, _db, _trigger) -> int:
    if action == sqlite3.SQLITE_ATTACH:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None and (arg1 or "").lower() not in _READING_PRAGMAS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def run_sql(sql: str, storage: str | None = None) -> pd.DataFrame:
    """Run one SQL statement through a read-only connection; its rows as a DataFrame.

    Raises:
        ReadOnlyRefused: The statement would write (INSERT, UPDATE, DELETE, DROP, ATTACH,
            a pragma that sets something, ...); the database is unchanged.
        StorageError: The statement failed otherwise (syntax, unknown table, ...).
    """
    engine = connect_readonly(storage)
    try:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            try:
                if engine.dialect.name == "postgresql":
                    # A prepared statement is a single statement: "...; COMMIT; SET ..." cannot
                    # end the read-only transaction and start a writable one.
                    cur.execute(sql, prepare=True)
                else:
                    cur.execute(sql)
                columns = [d[0] for d in cur.description] if cur.description else []
                rows = cur.fetchall() if cur.description else []
            finally:
                raw.rollback()
        finally:
            raw.close()
    except Exception as e:
        # Every database error becomes one readable line; a bug of ours stays a traceback.
        if not (isinstance(e, (sqlite3.Error, sqlalchemy.exc.SQLAlchemyError))
                or type(e).__module__.startswith("psycopg")):
            raise
        raise _query_error(e) from e
    finally:
        engine.dispose()
    return pd.DataFrame.from_records(rows, columns=columns)


def _query_error(e: Exception) -> StorageError:
    text = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    refused = ("readonly database", "read-only transaction", "not authorized", "authorization denied")
    if any(r in text.lower() for r in refused) or type(e).__name__ == "ReadOnlySqlTransaction":
        return ReadOnlyRefused(f"refused: hpo sql is read-only and the database would not write ({text})")
    return StorageError(f"query failed: {text}")


def _frame(engine: sqlalchemy.engine.Engine, sql: str, **params) -> pd.DataFrame:
    try:
        with engine.connect() as conn:
            return pd.read_sql(sqlalchemy.text(sql), conn, params=params)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise _query_error(e) from e


def _study_filter(study_name: str | None, numbers: list[int] | None) -> tuple[str, dict]:
    clauses, params = [], {}
    if study_name is not None:
        clauses.append("study_name = :study_name")
        params["study_name"] = study_name
    if numbers is not None:
        clauses.append(f"number IN ({', '.join(str(int(n)) for n in numbers) or 'NULL'})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _view(view: str, order: str, storage: str | None, study_name: str | None,
          numbers: list[int] | None = None, engine: sqlalchemy.engine.Engine | None = None) -> pd.DataFrame:
    where, params = _study_filter(study_name, numbers)
    own = engine is None
    engine = engine or connect_readonly(storage)
    try:
        return _frame(engine, f"SELECT * FROM {view}{where} ORDER BY {order}", **params)
    finally:
        if own:
            engine.dispose()


def trials_frame(storage: str | None = None, study_name: str | None = None, **kw) -> pd.DataFrame:
    """`hpo_trials` (one row per trial) of one study, or of all studies."""
    return _view("hpo_trials", "study_name, number", storage, study_name, **kw)


def params_frame(storage: str | None = None, study_name: str | None = None, **kw) -> pd.DataFrame:
    """`hpo_trial_params` (one row per trial and parameter)."""
    return _view("hpo_trial_params", "study_name, number, param_name", storage, study_name, **kw)


def seed_scores_frame(storage: str | None = None, study_name: str | None = None, **kw) -> pd.DataFrame:
    """`hpo_seed_scores` (one row per trial and seed)."""
    return _view("hpo_seed_scores", "study_name, number, seed_index", storage, study_name, **kw)


def curves_frame(storage: str | None = None, study_name: str | None = None, **kw) -> pd.DataFrame:
    """`hpo_learning_curves` (one row per trial, seed and epoch)."""
    return _view("hpo_learning_curves", "study_name, number, seed_index, epoch", storage, study_name, **kw)


def study_direction(engine: sqlalchemy.engine.Engine, study_name: str) -> str:
    """"minimize" or "maximize" (of the first objective).

    Raises:
        StudyNotFound: No study of that name.
    """
    rows = _frame(engine, "SELECT d.direction AS direction FROM study_directions d "
                          "JOIN studies s ON s.study_id = d.study_id "
                          "WHERE s.study_name = :name AND d.objective = 0", name=study_name)
    if rows.empty:
        raise StudyNotFound.named(study_name, study_names(engine=engine))
    return str(rows["direction"].iloc[0]).lower()


def study_names(storage: str | None = None, *, engine: sqlalchemy.engine.Engine | None = None) -> list[str]:
    """The names of the studies in the storage, sorted."""
    own = engine is None
    engine = engine or connect_readonly(storage)
    try:
        return _frame(engine, "SELECT study_name FROM studies ORDER BY study_name")["study_name"].tolist()
    finally:
        if own:
            engine.dispose()


def confirmations_frame(storage: str | None = None, study_name: str | None = None, **kw) -> pd.DataFrame:
    """`hpo_confirmations` (one row per trial refitted on fresh seeds by `hpo confirm`)."""
    return _view("hpo_confirmations", "study_name, number", storage, study_name, **kw)


def trial_attr(engine: sqlalchemy.engine.Engine, study_name: str, key: str) -> dict[int, object]:
    """One user attribute of every trial of the study that has it, by trial number."""
    rows = _frame(engine, "SELECT t.number, u.value_json FROM trial_user_attributes u "
                          "JOIN trials t ON t.trial_id = u.trial_id JOIN studies s ON s.study_id = t.study_id "
                          "WHERE s.study_name = :name AND u.key = :key", name=study_name, key=key)
    return {int(n): json.loads(v) for n, v in zip(rows["number"], rows["value_json"])}


def stored_spec(engine: sqlalchemy.engine.Engine, study_name: str) -> dict:
    """The spec hpo stored with the study (as `parse_spec` reads it), or {} for a study
    made without hpo."""
    rows = _frame(engine, "SELECT a.value_json FROM study_user_attributes a JOIN studies s ON s.study_id = a.study_id "
                          "WHERE s.study_name = :name AND a.key = 'hpo_spec'", name=study_name)
    return json.loads(rows["value_json"].iloc[0]) if not rows.empty else {}


def format_frame(frame: pd.DataFrame, fmt: str = "table") -> str:
    """A DataFrame as text: an aligned table, CSV, JSON records or a markdown table."""
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return frame.to_json(orient="records", date_format="iso")
    if fmt == "markdown":
        return _markdown(frame)
    if frame.empty:
        return "(no rows)" if len(frame.columns) else "(no result)"
    # A missing value reads the same whatever its column's type (NaN in numbers, None in
    # text): blank, as in the markdown and CSV forms.
    shown = frame.copy()
    for name in shown.columns[shown.dtypes == object]:
        shown[name] = [("" if x is None or (isinstance(x, float) and math.isnan(x)) else x) for x in shown[name]]
    return shown.to_string(index=False, na_rep="", float_format=lambda x: f"{x:.6g}")


def _markdown(frame: pd.DataFrame) -> str:
    def cell(x) -> str:
        if x is None:
            return ""
        if isinstance(x, float):
            return "" if math.isnan(x) else f"{x:.6g}"
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
