import math
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from scipy import stats

from hpo.views import VIEW_NAMES, create_views
from tests.conftest import ROOT
from tests.made import add_trial, make_study


def query(url: str, sql: str) -> list[dict]:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sqlalchemy.text(sql))]
    finally:
        engine.dispose()


def hand_made_study(url: str) -> optuna.Study:
    study = make_study(url)
    add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, [0.5, 0.7, 0.6], best_epochs=[3, 4, 5])
    add_trial(study, {"act": "tanh", "units": 64, "lr": 0.001}, [0.2, 0.2, 0.3, 0.3], best_epochs=[7, 8, 9, 10])
    add_trial(study, {"act": "relu", "units": 32, "lr": 0.1}, [0.4, float("nan"), float("inf")])
    return study


def run_while_replacing_views(storage_url: str, monkeypatch) -> int:
    """`hpo run beale` in a worker process while this one drops and creates the views
    (a new version marker each time) and queries them; how many times they were replaced."""
    worker = subprocess.Popen([sys.executable, "-m", "hpo", "run", "beale", "--storage", storage_url,
                               "--trials", "8", "--seeds", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    replaced = 0
    try:
        while worker.poll() is None and replaced < 3:
            monkeypatch.setattr("hpo.views.VIEWS_VERSION", f"hpo views test {replaced}")
            if create_views(storage_url):
                replaced += 1
                query(storage_url, "SELECT count(*) AS n FROM hpo_seed_scores")
            time.sleep(0.2)
        output = worker.communicate(timeout=300)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, output
    return replaced


def test_views_hold_the_numbers_the_trials_stored_even_if_replaced_while_a_worker_writes(storage_url, monkeypatch):
    assert run_while_replacing_views(storage_url, monkeypatch) >= 1
    study = optuna.load_study(study_name="beale", storage=storage_url)
    trials = {t.number: t for t in study.get_trials()}

    rows = {r["number"]: r for r in query(storage_url, "SELECT * FROM hpo_trials")}
    assert set(rows) == set(trials)
    for number, t in trials.items():
        a, r = t.user_attrs, rows[number]
        assert r["study_name"] == "beale" and r["state"] == t.state.name
        assert r["mean"] == pytest.approx(a["mean"]) and r["std"] == pytest.approx(a["std"])
        assert r["n_seeds"] == len(a["seed_scores"])
        half = stats.t.ppf(0.975, 2) * a["std"] / math.sqrt(3)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((a["mean"] - half, a["mean"] + half))
        assert r["mean_best_epoch"] == pytest.approx(sum(a["best_epochs"]) / 3)
        assert r["duration_s"] == pytest.approx((t.datetime_complete - t.datetime_start).total_seconds(), abs=1e-3)

    seeds = query(storage_url, "SELECT * FROM hpo_seed_scores ORDER BY number, seed_index")
    assert len(seeds) == 3 * len(trials)
    for r in seeds:
        a = trials[r["number"]].user_attrs
        i = r["seed_index"]
        assert (r["seed"], r["score"], r["best_epoch"], r["epochs_run"]) == (
            a["seeds"][i], pytest.approx(a["seed_scores"][i]), a["best_epochs"][i], a["epochs_run"][i])

    curves = query(storage_url, "SELECT * FROM hpo_learning_curves ORDER BY number, seed_index, epoch")
    assert len(curves) == sum(len(c["loss"]) for t in trials.values() for c in t.user_attrs["curves"])
    for r in curves:
        c = trials[r["number"]].user_attrs["curves"][r["seed_index"]]
        e = r["epoch"] - 1
        assert (r["loss"], r["val_loss"], r["metric"], r["val_metric"]) == pytest.approx(
            (c["loss"][e], c["val_loss"][e], c["metric"][e], c["val_metric"][e]))

    params = query(storage_url, "SELECT * FROM hpo_trial_params")
    assert len(params) == 2 * len(trials)
    for r in params:
        assert r["value_number"] == pytest.approx(trials[r["number"]].params[r["param_name"]])
        assert r["kind"] == "float"


def test_categoricals_are_decoded_and_non_finite_numbers_read_as_null(storage_url):
    study = hand_made_study(storage_url)
    assert create_views(storage_url) is True
    trials = study.get_trials()

    params = query(storage_url, "SELECT number, param_name, value, value_number, kind FROM hpo_trial_params")
    by_key = {(r["number"], r["param_name"]): r for r in params}
    for t in trials:
        act = by_key[(t.number, "act")]
        assert act["value"] == t.params["act"] and act["value_number"] is None and act["kind"] == "categorical"
        units = by_key[(t.number, "units")]
        assert units["value"] == str(t.params["units"]) and units["value_number"] == t.params["units"]
        assert units["kind"] == "int"

    rows = {r["number"]: r for r in query(storage_url, "SELECT * FROM hpo_trials")}
    assert rows[1]["n_seeds"] == 4
    assert rows[1]["ci_high"] - rows[1]["mean"] == pytest.approx(stats.t.ppf(0.975, 3) * rows[1]["std"] / 2)
    assert rows[2]["mean"] is None and rows[2]["std"] is None and rows[2]["ci_low"] is None

    scores = query(storage_url, "SELECT seed, score FROM hpo_seed_scores WHERE number = 2 ORDER BY seed_index")
    assert [(r["seed"], r["score"]) for r in scores] == [(10, 0.4), (11, None), (12, None)]
    last = query(storage_url, "SELECT val_loss FROM hpo_learning_curves WHERE number = 2 AND epoch = 3 "
                              "ORDER BY seed_index")
    assert [r["val_loss"] for r in last] == [0.4, None, None]


def test_create_views_is_idempotent_and_upgrades_old_markers(storage_url, monkeypatch):
    hand_made_study(storage_url)
    assert create_views(storage_url) is True
    assert create_views(storage_url) is False
    monkeypatch.setattr("hpo.views.VIEWS_VERSION", "hpo views v0-test")
    assert create_views(storage_url) is True
    assert create_views(storage_url) is False
    for name in VIEW_NAMES:
        # No trial of the hand-made study is confirmed: its view exists and is empty.
        assert (query(storage_url, f"SELECT count(*) AS n FROM {name}")[0]["n"] > 0) == (name != "hpo_confirmations")


def test_a_database_without_optuna_tables_gets_no_views(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert create_views(url) is False
    assert query(url, "SELECT count(*) AS n FROM sqlite_master")[0]["n"] == 0

