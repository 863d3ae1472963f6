"""Results: a study database URL in, read-only SQL and pandas DataFrames out: the `hpo_`
views per study, and a report that says which trial is best, by how much, and whether
the seeds can tell it from the runner-up, with a learning-curve diagnosis per trial.
"""

from __future__ import annotations

import json
import math
import contextlib
import os
import sqlite3
import statistics
from dataclasses import dataclass
from urllib.parse import quote

import pandas as pd
import sqlalchemy

from hpo.diagnosis import diagnose_curves
from hpo.errors import StorageError, StudyNotFound
from hpo.stats import bootstrap_ci, expected_best, p_improvement, p_improvement_words, welch
from hpo.storage import existing_sqlite_path, resolve_storage_url
from hpo.views import create_views, sqlite_views_current

FORMATS = ("table", "csv", "json", "markdown")
ALPHA = 0.05

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
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    @sqlalchemy.event.listens_for(engine, "connect")
    def _read_only(dbapi_conn, _record) -> None:
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


@dataclass
class Comparison:
    """Best trial against the runner-up: Welch's t-test on their per-seed scores."""

    best: int
    runner_up: int
    difference: float
    t: float
    p: float
    distinguishable: bool
    hint: str


@dataclass
class Report:
    """What `hpo report` prints: the top trials and the best-vs-runner-up comparison."""

    study_name: str
    direction: str
    n_complete: int
    top: pd.DataFrame
    comparison: Comparison | None


def study_direction(engine: sqlalchemy.engine.Engine, study_name: str) -> str:
    """"minimize" or "maximize" (of the first objective).

    Raises:
        StudyNotFound: No study of that name.
    """
    rows = _frame(engine, "SELECT d.direction AS direction FROM study_directions d "
                          "JOIN studies s ON s.study_id = d.study_id "
                          "WHERE s.study_name = :name AND d.objective = 0", name=study_name)
    if rows.empty:
        names = _frame(engine, "SELECT study_name FROM studies ORDER BY study_name")["study_name"].tolist()
        raise StudyNotFound(f'no study "{study_name}" in this storage; studies here: {", ".join(names) or "none"}')
    return str(rows["direction"].iloc[0]).lower()


def compare_scores(a: list[float], b: list[float], alpha: float = ALPHA) -> tuple[float, float, bool, str]:
    """Welch's t-test of two trials' per-seed scores: (t, p, distinguishable, hint).

    The hint is plain words for a person: whether the difference is real at this many
    seeds and, if not, roughly how many seeds would resolve a difference this size.
    """
    a = [x for x in a if x is not None and math.isfinite(x)]
    b = [x for x in b if x is not None and math.isfinite(x)]
    n = min(len(a), len(b))
    if n < 2:
        return math.nan, math.nan, False, f"cannot tell with {n} seed{'s' * (n != 1)}: raise seeds to 3 or more"
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    if var_a == 0 and var_b == 0:
        same = mean_a == mean_b
        return (math.nan, 1.0 if same else 0.0, not same,
                "identical per-seed scores" if same else "every seed agrees exactly: the difference is real")
    t, p = welch(a, b)
    if p < alpha:
        return t, p, True, f"distinguishable at {n} seeds (Welch p = {p:.2g})"
    diff = abs(mean_a - mean_b)
    if diff == 0:
        return t, p, False, f"not distinguishable at {n} seeds (same mean): either is as good"
    # Seeds per trial for a two-sided 5% test with 80% power at this difference and spread.
    needed = math.ceil((1.96 + 0.84) ** 2 * (var_a + var_b) / diff**2)
    if needed > 100 * n:
        return t, p, False, (f"not distinguishable at {n} seeds (Welch p = {p:.2g}): the difference is tiny next "
                             f"to the spread over seeds; treat them as equally good")
    return t, p, False, (f"not distinguishable at {n} seeds (Welch p = {p:.2g}): raise seeds "
                         f"(about {max(needed, n + 1)} would resolve a difference this size)")


def rank_trials(trials: pd.DataFrame, direction: str) -> pd.DataFrame:
    """The complete trials of a `trials_frame`, best objective value first (ties by mean)."""
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()]
    return done.sort_values(["value", "mean"], ascending=direction == "minimize", kind="stable")


def build_report(storage: str | None, study_name: str, top: int = 5) -> Report:
    """The study's top trials by objective value with mean ± std, 95% CI, seeds, params and
    diagnosis; and whether the best is distinguishable from the runner-up.

    Raises:
        StudyNotFound: No study of that name.
    """
    engine = connect_readonly(storage)
    try:
        direction = study_direction(engine, study_name)
        trials = trials_frame(study_name=study_name, engine=engine)
        done = rank_trials(trials, direction)
        ranked = done.head(top)
        numbers = [int(n) for n in ranked["number"]]
        params = params_frame(study_name=study_name, numbers=numbers, engine=engine)
        seeds = seed_scores_frame(study_name=study_name, numbers=numbers, engine=engine)
        curves = curves_frame(study_name=study_name, numbers=numbers, engine=engine)
    finally:
        engine.dispose()

    scores = {n: g["score"].tolist() for n, g in seeds.groupby("number")}
    table = ranked[["number", "value", "mean", "std", "ci_low", "ci_high", "n_seeds", "mean_best_epoch"]].copy()
    table.insert(0, "rank", range(1, len(table) + 1))
    table["seed_scores"] = [json.dumps([_round(s) for s in scores.get(n, [])]) for n in numbers]
    # Conditional params (SGD's momentum, a schedule's decay) exist only on some trials.
    by_trial = {n: dict(zip(g["param_name"], g["value"])) for n, g in params.groupby("number")}
    table["params"] = [", ".join(f"{k}={_short(v)}" for k, v in sorted(by_trial.get(n, {}).items()))
                       for n in numbers]
    table["diagnosis"] = [str(diagnose_curves(_curves_of(curves, n))) for n in numbers]
    table = table.reset_index(drop=True)

    comparison = None
    if len(numbers) >= 2:
        best, second = numbers[0], numbers[1]
        t, p, ok, hint = compare_scores(scores.get(best, []), scores.get(second, []))
        diff = float(ranked["value"].iloc[1] - ranked["value"].iloc[0])
        comparison = Comparison(best, second, abs(diff), t, p, ok, hint)
    return Report(study_name, direction, len(done), table, comparison)


def _curves_of(curves: pd.DataFrame, number: int) -> list[dict[str, list]]:
    rows = curves[curves["number"] == number]
    out = []
    for _, g in rows.groupby("seed_index", sort=True):
        g = g.sort_values("epoch")
        out.append({k: [None if pd.isna(x) else float(x) for x in g[k]] for k in ("loss", "val_loss")})
    return out


def _round(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(f"{x:.6g}")


def _short(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(v) if f.is_integer() and "." not in str(v) else f"{f:.4g}"


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
    return frame.to_string(index=False, float_format=lambda x: f"{x:.6g}")


def _markdown(frame: pd.DataFrame) -> str:
    def cell(x) -> str:
        if isinstance(x, float):
            return "" if math.isnan(x) else f"{x:.6g}"
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def format_report(report: Report, fmt: str = "table") -> str:
    """The report as text in one of FORMATS (csv and json carry the comparison as columns)."""
    c = report.comparison
    if fmt in ("csv", "json"):
        frame = report.top.copy()
        frame["distinguishable_from_next"] = None
        if c is not None and not frame.empty:
            frame.loc[0, "distinguishable_from_next"] = c.distinguishable
            frame["welch_p"] = [c.p] + [None] * (len(frame) - 1)
        return format_frame(frame, fmt)
    head = (f"study {report.study_name}: {report.n_complete} complete trials, {report.direction}; "
            f"top {len(report.top)} by objective value")
    lines = [f"## {head}" if fmt == "markdown" else head, ""]
    lines.append(format_frame(report.top, "markdown" if fmt == "markdown" else "table"))
    lines.append("")
    if c is None:
        lines.append("fewer than two complete trials: nothing to compare yet")
    else:
        lines.append(f"best #{c.best} vs runner-up #{c.runner_up}: difference {c.difference:.4g}; {c.hint}")
    return "\n".join(lines)
