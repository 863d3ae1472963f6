import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy

from hpo.reports.stats import bootstrap_ci
from hpo.store.storage import write_trial_user_attrs
from hpo.store.views import VIEW_NAMES, create_views
from tests.conftest import ROOT
from tests.made import add_trial, curve_record, make_study


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
            monkeypatch.setattr("hpo.store.views.VIEWS_VERSION", f"hpo views test {replaced}")
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
        assert r["n_seeds"] == len(a["seed_scores"]) and r["n_added_seeds"] == 0
        # The bootstrap interval the objective stored, as hpo report prints it: inside the
        # seeds' range, so never below zero for Beale's non-negative values.
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(bootstrap_ci(a["seed_scores"]))
        assert 0 <= r["ci_low"] <= r["ci_high"]
        assert min(a["seed_scores"]) - 1e-9 <= r["ci_low"] and r["ci_high"] <= max(a["seed_scores"]) + 1e-9
        assert r["mean_best_epoch"] == pytest.approx(sum(a["best_epochs"]) / 3)
        # SQLite's julianday keeps milliseconds of each time: up to 1 ms off at either end.
        assert r["duration_s"] == pytest.approx((t.datetime_complete - t.datetime_start).total_seconds(), abs=2e-3)

    seeds = query(storage_url, "SELECT * FROM hpo_seed_scores ORDER BY number, seed_index")
    assert len(seeds) == 3 * len(trials)
    for r in seeds:
        a = trials[r["number"]].user_attrs
        i = r["seed_index"]
        assert (r["seed"], r["score"], r["best_epoch"], r["epochs_run"], r["added"]) == (
            a["seeds"][i], pytest.approx(a["seed_scores"][i]), a["best_epochs"][i], a["epochs_run"][i], 0)

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
    assert (rows[1]["ci_low"], rows[1]["ci_high"]) == pytest.approx(bootstrap_ci([0.2, 0.2, 0.3, 0.3]))
    assert rows[2]["mean"] is None and rows[2]["std"] is None and rows[2]["ci_low"] is None

    scores = query(storage_url, "SELECT seed, score FROM hpo_seed_scores WHERE number = 2 ORDER BY seed_index")
    assert [(r["seed"], r["score"]) for r in scores] == [(10, 0.4), (11, None), (12, None)]
    last = query(storage_url, "SELECT val_loss FROM hpo_learning_curves WHERE number = 2 AND epoch = 3 "
                              "ORDER BY seed_index")
    assert [r["val_loss"] for r in last] == [0.4, None, None]


def test_seeds_added_to_an_incumbent_count_in_every_view_and_old_trials_get_no_interval(storage_url):
    study = make_study(storage_url)
    # Student's t would put this trial's lower bound below zero (mean 0.35, std 0.3, 3 seeds).
    old = add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, [0.05, 0.35, 0.65], stored_ci=False)
    grown = add_trial(study, {"act": "tanh", "units": 32, "lr": 0.01}, [0.02, 0.1, 0.9])
    all_scores = [0.02, 0.1, 0.9, 0.04, 0.3]
    write_trial_user_attrs(study._storage._backend, grown._trial_id, {
        "incumbent_seeds": [13, 14], "incumbent_scores": [0.04, 0.3], "incumbent_best_epochs": [5, 6],
        "incumbent_epochs_run": [7, 8], "incumbent_curves": curve_record([0.04, 0.3]),
        "all_seeds_mean": sum(all_scores) / 5, "all_seeds_std": 0.37,
        "ci_low": bootstrap_ci(all_scores)[0], "ci_high": bootstrap_ci(all_scores)[1]})
    create_views(storage_url)

    rows = {r["number"]: r for r in query(storage_url, "SELECT * FROM hpo_trials")}
    assert rows[old.number]["ci_low"] is None and rows[old.number]["ci_high"] is None
    r = rows[grown.number]
    assert r["value"] == pytest.approx(grown.value)  # what it was selected on, unchanged
    assert (r["n_seeds"], r["n_added_seeds"], r["mean"], r["std"]) == (5, 2, pytest.approx(0.272), 0.37)
    assert 0 < r["ci_low"] < r["mean"] < r["ci_high"] and (r["ci_low"], r["ci_high"]) == pytest.approx(
        bootstrap_ci(all_scores))
    assert r["mean_best_epoch"] == pytest.approx((3 * 3 + 5 + 6) / 5)

    seeds = query(storage_url, f"SELECT seed_index, seed, score, best_epoch, epochs_run, added FROM hpo_seed_scores "
                               f"WHERE number = {grown.number} ORDER BY seed_index")
    assert [tuple(s.values()) for s in seeds] == [(0, 10, 0.02, 3, 5, 0), (1, 11, 0.1, 3, 5, 0), (2, 12, 0.9, 3, 5, 0),
                                                   (3, 13, 0.04, 5, 7, 1), (4, 14, 0.3, 6, 8, 1)]
    curves = query(storage_url, f"SELECT seed_index, seed, val_loss, added FROM hpo_learning_curves "
                                f"WHERE number = {grown.number} AND epoch = 3 ORDER BY seed_index")
    assert [(c["seed_index"], c["seed"], c["val_loss"], c["added"]) for c in curves][3:] == [
        (3, 13, pytest.approx(0.04), 1), (4, 14, pytest.approx(0.3), 1)]


def test_create_views_is_idempotent_and_upgrades_old_markers(storage_url, monkeypatch):
    hand_made_study(storage_url)
    assert create_views(storage_url) is True
    assert create_views(storage_url) is False
    monkeypatch.setattr("hpo.store.views.VIEWS_VERSION", "hpo views v0-test")
    assert create_views(storage_url) is True
    assert create_views(storage_url) is False
    for name in VIEW_NAMES:
        # No trial of the hand-made study is confirmed: its view exists and is empty.
        assert (query(storage_url, f"SELECT count(*) AS n FROM {name}")[0]["n"] > 0) == (name != "hpo_confirmations")


def test_a_database_without_optuna_tables_gets_no_views(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert create_views(url) is False
    assert query(url, "SELECT count(*) AS n FROM sqlite_master")[0]["n"] == 0

