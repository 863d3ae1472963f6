"""SQL views: a study database (Optuna's tables, our per-seed user attributes) in, five
`hpo_` views out that read like a results table, on SQLite and on PostgreSQL.

`hpo_trials` (one row per trial), `hpo_trial_params` (trial x parameter, categoricals
decoded), `hpo_seed_scores` (trial x seed), `hpo_learning_curves` (trial x seed x epoch)
and `hpo_confirmations` (one row per confirmed trial). A trial's seeds are every seed it
was fitted on: those it was selected on, then any added while it was the incumbent
(`added` = 1). `ci_low`/`ci_high` are the bootstrap interval stored with the trial (SQL
cannot resample); trials recorded before it was stored have NULL there.
Non-finite numbers (Python's json writes `NaN`/`Infinity`, which is not JSON) read as NULL.
"""

from __future__ import annotations

from functools import lru_cache

import sqlalchemy

from hpo.errors import StorageError
from hpo.store.faults import first_line
from hpo.store.urls import engine_kwargs

VIEW_NAMES = ("hpo_trials", "hpo_trial_params", "hpo_seed_scores", "hpo_learning_curves", "hpo_confirmations")
# Bump when the SQL of any view changes: databases carrying an older marker get the views
# dropped and created again on the next create_views.
VIEWS_VERSION = "hpo views v3"


def create_views(engine_or_url: sqlalchemy.engine.Engine | str) -> bool:
    """Create (or bring up to date) the `hpo_` views in a study database.

    Idempotent and cheap when the views are current (a catalogue read, no write), and safe
    while workers write trials: creation takes one short transaction, serialised between
    concurrent callers (SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock).

    Args:
        engine_or_url: A SQLAlchemy engine or URL of a database holding Optuna's tables.

    Returns:
        True if views were created or replaced, False if they were already current or the
        database holds no Optuna tables.

    Raises:
        StorageError: The database refused (read-only file, missing privilege, a view of
            ours that other objects depend on).
    """
    if isinstance(engine_or_url, str):
        engine = sqlalchemy.create_engine(engine_or_url, **engine_kwargs(engine_or_url))
    else:
        engine = engine_or_url
    try:
        if engine.dialect.name == "sqlite":
            return _create_sqlite(engine)
        if engine.dialect.name == "postgresql":
            return _create_postgresql(engine)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise StorageError(f"storage {engine.url.render_as_string(hide_password=True)}: {first_line(e)} "
                           f"(while creating the hpo_ views)") from e
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()
    raise StorageError(f"hpo_ views exist for SQLite and PostgreSQL only, not {engine.dialect.name}")


def sqlite_views_current(cur) -> bool | None:
    """Whether a SQLite database's `hpo_` views are up to date (None: no Optuna tables).

    Reads the catalogue only, so a read-only connection can answer it.
    """
    rows = dict(cur.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'view') "
                            "AND name IN ('trials', " + ", ".join(f"'{v}'" for v in VIEW_NAMES) + ")").fetchall())
    if "trials" not in rows:
        return None
    return all(VIEWS_VERSION in (rows.get(v) or "") for v in VIEW_NAMES)


def _create_sqlite(engine: sqlalchemy.engine.Engine) -> bool:
    current = sqlite_views_current
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        state = current(conn.cursor())
        if state is None or state:
            return False
        saved = conn.isolation_level
        conn.isolation_level = None
        try:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if not current(cur):
                    for name, body in _view_sql("sqlite").items():
                        cur.execute(f"DROP VIEW IF EXISTS {name}")
                        cur.execute(f"CREATE VIEW {name} AS /* {VIEWS_VERSION} */\n{body}")
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        finally:
            conn.isolation_level = saved
        return True
    except Exception as e:
        if isinstance(e, sqlalchemy.exc.SQLAlchemyError):
            raise
        raise sqlalchemy.exc.OperationalError("create views", None, e) from e
    finally:
        raw.close()


def _create_postgresql(engine: sqlalchemy.engine.Engine) -> bool:
    marker_sql = sqlalchemy.text(
        "SELECT to_regclass('trials') IS NOT NULL, "
        + ", ".join(f"obj_description(to_regclass('{v}'), 'pg_class')" for v in VIEW_NAMES))

    def current(conn) -> bool | None:
        has_trials, *markers = conn.execute(marker_sql).one()
        if not has_trials:
            return None
        return all(m == VIEWS_VERSION for m in markers)

    with engine.connect() as conn:
        state = current(conn)
        conn.rollback()
        if state is None or state:
            return False
    with engine.begin() as conn:
        # Two workers starting together would otherwise race on the catalogue
        # ("tuple concurrently updated"); the lock ends with the transaction.
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(hashtext('hpo_views'))"))
        if current(conn):
            return False
        for name, body in _view_sql("postgresql").items():
            conn.execute(sqlalchemy.text(f"DROP VIEW IF EXISTS {name}"))
            conn.execute(sqlalchemy.text(f"CREATE VIEW {name} AS\n{body}"))
            conn.execute(sqlalchemy.text(f"COMMENT ON VIEW {name} IS '{VIEWS_VERSION}'"))
    return True


def _clean(expr: str) -> str:
    # Python's json module writes NaN, Infinity and -Infinity, which neither SQLite nor
    # PostgreSQL parse; as null they read as NULL instead of failing the whole query.
    return f"replace(replace(replace({expr}, '-Infinity', 'null'), 'Infinity', 'null'), 'NaN', 'null')"


@lru_cache(maxsize=None)
def _view_sql(dialect: str) -> dict[str, str]:
    return _sqlite_views() if dialect == "sqlite" else _postgresql_views()


def _sqlite_views() -> dict[str, str]:
    def attr(key: str) -> str:
        return f"(SELECT {_clean('u.value_json')} FROM trial_user_attributes u WHERE u.trial_id = t.trial_id AND u.key = '{key}')"

    trials = f"""SELECT study_name, study_id, trial_id, number, state, value, mean, std,
       n_selection + n_added AS n_seeds, CASE WHEN n_selection IS NOT NULL THEN n_added END AS n_added_seeds,
       ci_low, ci_high,
       (SELECT avg(e.value) FROM (SELECT value FROM json_each(best_epochs_json)
                                  UNION ALL SELECT value FROM json_each(added_best_epochs_json)) e) AS mean_best_epoch,
       duration_s, datetime_start, datetime_complete
FROM (
  SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state,
         (SELECT v.value FROM trial_values v WHERE v.trial_id = t.trial_id AND v.objective = 0
            AND v.value_type = 'FINITE') AS value,
         COALESCE(json_extract({attr('all_seeds_mean')}, '$'), json_extract({attr('mean')}, '$')) AS mean,
         COALESCE(json_extract({attr('all_seeds_std')}, '$'), json_extract({attr('std')}, '$')) AS std,
         json_array_length({attr('seed_scores')}) AS n_selection,
         COALESCE(json_array_length({attr('incumbent_scores')}), 0) AS n_added,
         json_extract({attr('ci_low')}, '$') AS ci_low,
         json_extract({attr('ci_high')}, '$') AS ci_high,
         {attr('best_epochs')} AS best_epochs_json,
         {attr('incumbent_best_epochs')} AS added_best_epochs_json,
         (julianday(t.datetime_complete) - julianday(t.datetime_start)) * 86400.0 AS duration_s,
         t.datetime_start, t.datetime_complete
  FROM trials t JOIN studies s ON s.study_id = t.study_id
)"""

    choice = "json_extract(p.distribution_json, '$.attributes.choices[' || CAST(p.param_value AS INTEGER) || ']')"
    choice_type = choice.replace("json_extract(", "json_type(", 1)
    params = f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, p.param_name,
       CASE
         WHEN json_extract(p.distribution_json, '$.name') = 'CategoricalDistribution' THEN
           CASE {choice_type} WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE CAST({choice} AS TEXT) END
         WHEN json_extract(p.distribution_json, '$.name') LIKE 'Int%' THEN CAST(CAST(p.param_value AS INTEGER) AS TEXT)
         ELSE CAST(p.param_value AS TEXT)
       END AS value,
       CASE
         WHEN json_extract(p.distribution_json, '$.name') = 'CategoricalDistribution' THEN
           CASE WHEN {choice_type} IN ('integer', 'real') THEN {choice} END
         ELSE p.param_value
       END AS value_number,
       CASE
         WHEN json_extract(p.distribution_json, '$.name') = 'CategoricalDistribution' THEN 'categorical'
         WHEN json_extract(p.distribution_json, '$.name') LIKE 'Int%' THEN 'int'
         ELSE 'float'
       END AS kind
FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id JOIN studies s ON s.study_id = t.study_id"""

    def seeds_of(prefix: str, scores_key: str, offset: str, added: int) -> str:
        return f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state,
       {offset}sc.key AS seed_index,
       json_extract({attr(prefix + 'seeds')}, '$[' || sc.key || ']') AS seed,
       sc.value AS score,
       json_extract({attr(prefix + 'best_epochs')}, '$[' || sc.key || ']') AS best_epoch,
       json_extract({attr(prefix + 'epochs_run')}, '$[' || sc.key || ']') AS epochs_run,
       {added} AS added
FROM trials t JOIN studies s ON s.study_id = t.study_id
JOIN trial_user_attributes us ON us.trial_id = t.trial_id AND us.key = '{scores_key}'
JOIN json_each({_clean('us.value_json')}) sc"""

    # Seeds added while the trial was the incumbent follow those it was selected on.
    offset = f"json_array_length({attr('seed_scores')}) + "
    seeds = seeds_of("", "seed_scores", "", 0) + "\nUNION ALL\n" + seeds_of("incumbent_", "incumbent_scores", offset, 1)

    def at(curve: str) -> str:
        return f"json_extract(c.value, '$.{curve}[' || e.key || ']')"

    def curves_of(prefix: str, offset: str, added: int) -> str:
        return f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state,
       {offset}c.key AS seed_index,
       json_extract({attr(prefix + 'seeds')}, '$[' || c.key || ']') AS seed,
       e.key + 1 AS epoch,
       e.value AS loss, {at('val_loss')} AS val_loss, {at('metric')} AS metric, {at('val_metric')} AS val_metric,
       {added} AS added
FROM trials t JOIN studies s ON s.study_id = t.study_id
JOIN trial_user_attributes uc ON uc.trial_id = t.trial_id AND uc.key = '{prefix}curves'
JOIN json_each({_clean('uc.value_json')}) c
JOIN json_each(c.value, '$.loss') e"""

    curves = curves_of("", "", 0) + "\nUNION ALL\n" + curves_of("incumbent_", offset, 1)

    # One row per confirmed trial: selection-time figures beside the fresh-seed ones.
    confirmations = f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state,
       json_extract({attr('mean')}, '$') AS mean,
       json_extract({attr('std')}, '$') AS std,
       json_array_length({attr('seed_scores')}) AS n_seeds,
       json_extract(uc.value_json, '$') AS confirm_mean,
       json_extract({attr('confirm_std')}, '$') AS confirm_std,
       json_array_length({attr('confirm_scores')}) AS n_confirm_seeds,
       {attr('confirm_seeds')} AS confirm_seeds,
       {attr('confirm_scores')} AS confirm_scores
FROM trials t JOIN studies s ON s.study_id = t.study_id
JOIN trial_user_attributes uc ON uc.trial_id = t.trial_id AND uc.key = 'confirm_mean'"""
    return {"hpo_trials": trials, "hpo_trial_params": params, "hpo_seed_scores": seeds, "hpo_learning_curves": curves,
            "hpo_confirmations": confirmations}


def _postgresql_views() -> dict[str, str]:
    def attr(key: str) -> str:
        return (f"(SELECT {_clean('u.value_json')}::jsonb FROM trial_user_attributes u "
                f"WHERE u.trial_id = t.trial_id AND u.key = '{key}')")

    def num(expr: str) -> str:
        return f"(({expr}) #>> '{{}}')::double precision"

    trials = f"""SELECT study_name, study_id, trial_id, number, state, value, mean, std,
       n_selection + n_added AS n_seeds, CASE WHEN n_selection IS NOT NULL THEN n_added END AS n_added_seeds,
       ci_low, ci_high,
       (SELECT avg(e::double precision) FROM (SELECT jsonb_array_elements_text(best_epochs_json)
                                              UNION ALL SELECT jsonb_array_elements_text(added_best_epochs_json)) b(e))
         AS mean_best_epoch,
       duration_s, datetime_start, datetime_complete
FROM (
  SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state::text AS state,
         (SELECT v.value FROM trial_values v WHERE v.trial_id = t.trial_id AND v.objective = 0
            AND v.value_type::text = 'FINITE') AS value,
         COALESCE({num(attr('all_seeds_mean'))}, {num(attr('mean'))}) AS mean,
         COALESCE({num(attr('all_seeds_std'))}, {num(attr('std'))}) AS std,
         jsonb_array_length({attr('seed_scores')}) AS n_selection,
         COALESCE(jsonb_array_length({attr('incumbent_scores')}), 0) AS n_added,
         {num(attr('ci_low'))} AS ci_low,
         {num(attr('ci_high'))} AS ci_high,
         {attr('best_epochs')} AS best_epochs_json,
         {attr('incumbent_best_epochs')} AS added_best_epochs_json,
         EXTRACT(EPOCH FROM (t.datetime_complete - t.datetime_start))::double precision AS duration_s,
         t.datetime_start, t.datetime_complete
  FROM trials t JOIN studies s ON s.study_id = t.study_id
) x"""

    params = """SELECT s.study_name, s.study_id, t.trial_id, t.number, p.param_name,
       CASE
         WHEN d.name = 'CategoricalDistribution' THEN d.choice #>> '{}'
         WHEN d.name LIKE 'Int%' THEN round(p.param_value)::bigint::text
         ELSE p.param_value::text
       END AS value,
       CASE
         WHEN d.name = 'CategoricalDistribution' THEN
           CASE WHEN jsonb_typeof(d.choice) = 'number' THEN (d.choice #>> '{}')::double precision END
         ELSE p.param_value
       END AS value_number,
       CASE
         WHEN d.name = 'CategoricalDistribution' THEN 'categorical'
         WHEN d.name LIKE 'Int%' THEN 'int'
         ELSE 'float'
       END AS kind
FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id JOIN studies s ON s.study_id = t.study_id
CROSS JOIN LATERAL (
  SELECT p.distribution_json::jsonb ->> 'name' AS name,
         p.distribution_json::jsonb -> 'attributes' -> 'choices' -> (round(p.param_value)::int) AS choice
) d"""

    def seeds_of(prefix: str, scores_key: str, offset: str, added: int) -> str:
        return f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state::text AS state,
       ({offset}sc.i - 1)::int AS seed_index,
       (a.seeds ->> (sc.i - 1)::int)::bigint AS seed,
       (sc.score #>> '{{}}')::double precision AS score,
       (a.best_epochs ->> (sc.i - 1)::int)::int AS best_epoch,
       (a.epochs_run ->> (sc.i - 1)::int)::int AS epochs_run,
       {added} AS added
FROM trials t JOIN studies s ON s.study_id = t.study_id
JOIN trial_user_attributes us ON us.trial_id = t.trial_id AND us.key = '{scores_key}'
CROSS JOIN LATERAL (SELECT {attr(prefix + 'seeds')} AS seeds, {attr(prefix + 'best_epochs')} AS best_epochs,
                           {attr(prefix + 'epochs_run')} AS epochs_run) a
CROSS JOIN LATERAL jsonb_array_elements({_clean('us.value_json')}::jsonb) WITH ORDINALITY AS sc(score, i)"""

    # Seeds added while the trial was the incumbent follow those it was selected on.
    offset = f"jsonb_array_length({attr('seed_scores')}) + "
    seeds = seeds_of("", "seed_scores", "", 0) + "\nUNION ALL\n" + seeds_of("incumbent_", "incumbent_scores", offset, 1)

    def at(curve: str) -> str:
        return f"(c.curve -> '{curve}' ->> (e.j - 1)::int)::double precision"

    def curves_of(prefix: str, offset: str, added: int) -> str:
        return f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state::text AS state,
       ({offset}c.i - 1)::int AS seed_index,
       (a.seeds ->> (c.i - 1)::int)::bigint AS seed,
       e.j::int AS epoch,
       (e.loss #>> '{{}}')::double precision AS loss, {at('val_loss')} AS val_loss,
       {at('metric')} AS metric, {at('val_metric')} AS val_metric,
       {added} AS added
FROM trials t JOIN studies s ON s.study_id = t.study_id
JOIN trial_user_attributes uc ON uc.trial_id = t.trial_id AND uc.key = '{prefix}curves'
CROSS JOIN LATERAL (SELECT {attr(prefix + 'seeds')} AS seeds) a
CROSS JOIN LATERAL jsonb_array_elements({_clean('uc.value_json')}::jsonb) WITH ORDINALITY AS c(curve, i)
CROSS JOIN LATERAL jsonb_array_elements(c.curve -> 'loss') WITH ORDINALITY AS e(loss, j)"""

    curves = curves_of("", "", 0) + "\nUNION ALL\n" + curves_of("incumbent_", offset, 1)

    confirmations = f"""SELECT s.study_name, s.study_id, t.trial_id, t.number, t.state::text AS state,
       {num(attr('mean'))} AS mean,
       {num(attr('std'))} AS std,
       jsonb_array_length({attr('seed_scores')}) AS n_seeds,
       {num(_clean('uc.value_json') + '::jsonb')} AS confirm_mean,
       {num(attr('confirm_std'))} AS confirm_std,
       jsonb_array_length({attr('confirm_scores')}) AS n_confirm_seeds,
       {attr('confirm_seeds')}::text AS confirm_seeds,
       {attr('confirm_scores')}::text AS confirm_scores
FROM trials t JOIN studies s ON s.study_id = t.study_id
JOIN trial_user_attributes uc ON uc.trial_id = t.trial_id AND uc.key = 'confirm_mean'"""
    return {"hpo_trials": trials, "hpo_trial_params": params, "hpo_seed_scores": seeds, "hpo_learning_curves": curves,
            "hpo_confirmations": confirmations}
