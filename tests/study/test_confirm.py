"""Confirmation on fresh seeds and adaptive seeds, through the real `hpo` command on real
databases (analytic family: no Keras, milliseconds per trial)."""

import json
import shlex
import statistics
import subprocess
import sys

import pytest
import sqlalchemy
from optuna_dashboard._note import get_note_from_system_attrs

from hpo.errors import TrialDiverged, TrialFailed
from hpo.reports.report import build_report, format_report
from hpo.reports.results import confirmations_frame, run_sql
from hpo.reports.stats import bootstrap_ci
from hpo.specs import parse_spec
from hpo.store.storage import claim_work, get_storage, rdb_storage, release_claim
from hpo.study.race import INCUMBENT_CLAIM_PREFIX, fit_incumbent_seeds
from hpo.study.study import create_study
from hpo.study.workers import run_trials
from hpo.train.fit import fit_repeats
from tests.conftest import ROOT, run_hpo

GRID_STUDY = """
name = "{name}"
seed = 1
trials = 9
seeds = {seeds}

[model]
family = "analytic"
function = "sphere"
noise = 0.1
{extra_model}

[training]
max_epochs = 6
patience = 6

[sampler]
kind = "grid"

[pruner]
kind = "none"

[space]
x = {{ low = 0.0, high = 4.0, step = 0.5 }}
{extra}
"""


def write_study(tmp_path, name: str, seeds: str, extra: str = "", extra_model: str = ""):
    path = tmp_path / f"{name}.toml"
    path.write_text(GRID_STUDY.format(name=name, seeds=seeds, extra=extra, extra_model=extra_model))
    return str(path)


def user_attrs(url: str, name: str) -> dict[int, dict]:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT t.number, u.key, u.value_json FROM trial_user_attributes u JOIN trials t "
                "ON t.trial_id = u.trial_id JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :n"),
                {"n": name}).all()
    finally:
        engine.dispose()
    out: dict[int, dict] = {}
    for number, key, value in rows:
        out.setdefault(number, {})[key] = json.loads(value)
    return out


def test_confirm_refits_the_top_trials_on_unseen_seeds_and_the_view_reads_them_back(tmp_path, storage_url):
    run_hpo("run", write_study(tmp_path, "conf", "3"), "--storage", storage_url)
    out = run_hpo("confirm", "--study-name", "conf", "--storage", storage_url, "--top", "2", "--seeds", "4").stdout
    assert out.count("confirmed trial") == 2
    # The printed next command runs as printed, on this storage.
    hint = shlex.split(out.split("see ")[-1])
    assert "study conf:" in run_hpo(*hint[1:]).stdout
    attrs = user_attrs(storage_url, "conf")
    confirmed = {n: a for n, a in attrs.items() if "confirm_mean" in a}
    assert len(confirmed) == 2
    used = {s for a in attrs.values() for s in a.get("seeds", [])}
    for a in confirmed.values():
        assert len(a["confirm_seeds"]) == 4 and not set(a["confirm_seeds"]) & used
        # The sequence continues the trials' own: seed*1000 + 3, + 4, ...
        assert a["confirm_seeds"] == [1003, 1004, 1005, 1006]
        assert abs(a["confirm_mean"] - sum(a["confirm_scores"]) / 4) < 1e-9 and a["confirm_std"] > 0
    view = run_sql("SELECT number, confirm_mean, n_confirm_seeds, confirm_seeds FROM hpo_confirmations "
                   "ORDER BY number", storage_url)
    assert sorted(view["number"].tolist()) == sorted(confirmed)
    assert view["n_confirm_seeds"].tolist() == [4, 4]
    assert json.loads(view["confirm_seeds"].iloc[0]) == [1003, 1004, 1005, 1006]
    for number, mean in zip(view["number"], view["confirm_mean"]):
        assert abs(mean - confirmed[number]["confirm_mean"]) < 1e-12
    # Each confirmed trial's dashboard note shows its confirmation.
    storage = get_storage(storage_url)
    study_id = storage.get_study_id_from_name("conf")
    for trial in storage.get_all_trials(study_id):
        note = get_note_from_system_attrs(storage.get_study_system_attrs(study_id), trial._trial_id)
        if trial.number in confirmed:
            mean = confirmed[trial.number]["confirm_mean"]
            assert note["version"] == 2 and f"**Confirmed on 4 fresh seeds:** {mean:.5g} ± " in note["body"]
            assert "(seeds 1003, 1004, 1005, 1006; per seed: " in note["body"]
        else:
            assert "Confirmed" not in note["body"]
    storage.engine.dispose()
    # A second run finds nothing left to refit; the report ranks by the confirmed mean.
    again = run_hpo("confirm", "--study-name", "conf", "--storage", storage_url, "--top", "2").stdout
    assert "confirmed 0 trials here" in again
    report = build_report(storage_url, "conf", top=3)
    assert report.ranked_by.startswith("confirmed mean")
    top = report.top
    assert top["confirm_mean"].iloc[0] <= top["confirm_mean"].iloc[1]
    assert report.comparison.on == "fresh confirmation seeds"
    assert top["confirmation"].iloc[2] is None and "confirmed (seeds)" in format_report(report)


def test_confirm_on_a_study_with_no_complete_trial_says_why_and_fails(tmp_path):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    run_hpo("create", write_study(tmp_path, "none", "2"), "--storage", url)
    result = run_hpo("confirm", "--study-name", "none", "--storage", url, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith('error: study "none" has no complete trial to confirm (0 pruned, 0 failed); '
                                    "run trials first")
    assert "confirmed 0" not in result.stdout


def test_an_adaptive_study_opens_with_its_seed_range(tmp_path):
    url = f"sqlite:///{tmp_path / 'range.db'}"
    out = run_hpo("run", write_study(tmp_path, "range", "{ min = 2, max = 4 }"), "--storage", url,
                  "--trials", "2").stdout
    assert "budget 2 trials, 2-4 seeds each (adaptive), up to 6 epochs" in out.splitlines()[0]


def test_workers_share_confirmation_without_refitting_a_trial_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'share.db'}"
    # Each epoch sleeps, so both confirm processes overlap while the other refits.
    run_hpo("run", write_study(tmp_path, "share", "2", extra_model="epoch_seconds = 0.05"), "--storage", url)
    cmd = [sys.executable, "-m", "hpo", "confirm", "--study-name", "share", "--storage", url, "--top", "4", "--seeds", "2"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    refits = [line for out, _ in outs for line in out.splitlines() if line.startswith("confirmed trial")]
    assert len(refits) == 4 and len({line.split(":")[0] for line in refits}) == 4
    assert len(confirmations_frame(url, "share")) == 4


def test_a_study_confirms_itself_at_the_end_when_its_spec_asks(tmp_path):
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    out = run_hpo("run", write_study(tmp_path, "auto", "2", extra="\n[confirm]\ntop = 2\nseeds = 3\n"),
                  "--storage", url).stdout
    assert out.count("confirmed trial") == 2
    assert len(confirmations_frame(url, "auto")) == 2


def fits_and_winner(url: str, name: str) -> tuple[int, float, dict]:
    attrs = user_attrs(url, name)
    fits = sum(len(a["seed_scores"]) for a in attrs.values())
    trials = run_sql(f"SELECT number, value FROM hpo_trials WHERE study_name = '{name}' ORDER BY value", url)
    best = int(trials["number"].iloc[0])
    x = run_sql(f"SELECT value_number FROM hpo_trial_params WHERE study_name = '{name}' AND number = {best}", url)
    return fits, float(x["value_number"].iloc[0]), attrs


def test_adaptive_seeds_spend_fewer_fits_than_fixed_seeds_and_reach_the_same_winner(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    run_hpo("run", write_study(tmp_path, "fixed", "8"), "--storage", url)
    run_hpo("run", write_study(tmp_path, "adaptive", "{ min = 2, max = 8 }"), "--storage", url)
    fixed_fits, fixed_x, _ = fits_and_winner(url, "fixed")
    adaptive_fits, adaptive_x, attrs = fits_and_winner(url, "adaptive")
    assert fixed_fits == 9 * 8
    assert adaptive_fits < fixed_fits / 2
    assert adaptive_x == fixed_x == 0.0
    reasons = [a["seed_stop_reason"] for a in attrs.values()]
    # Far-off grid points are told apart from the incumbent at the first batch and stop.
    assert sum(r.startswith("worse than incumbent") for r in reasons) >= 5
    assert all(2 <= len(a["seed_scores"]) <= 8 and len(a["seed_scores"]) % 2 == 0 for a in attrs.values())


def test_seeds_confirm_and_score_are_checked_with_one_line_errors(tmp_path):
    from hpo.errors import SpecError
    from hpo.specs import parse_spec, spec_to_dict

    base = {"name": "s", "model": {"family": "analytic"}, "space": {"x": {"low": -1.0, "high": 1.0}}}
    spec = parse_spec({**base, "seeds": {"min": 2, "max": 6}, "confirm": {"top": 2, "seeds": 4},
                       "training": {"score": "last"}})
    assert (spec.seeds, spec.seeds_max, spec.confirm.top, spec.training.score) == (2, 6, 2, "last")
    assert parse_spec(spec_to_dict(spec)) == spec
    assert spec.with_overrides(seeds=4).seeds_max is None
    for raw, field, words in [({"seeds": {"min": 5, "max": 3}}, "seeds.max", "set max >= min"),
                              ({"seeds": {"min": 2, "most": 3}}, "seeds.most", "unknown key"),
                              ({"confirm": {"seeds": 1}}, "confirm.seeds", "outside 2..1000"),
                              ({"training": {"score": "final"}}, "training.score", "'best', 'last'")]:
        with pytest.raises(SpecError) as e:
            parse_spec({**base, **raw})
        assert field in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\nseeds = { min = 5, max = 3 }\n[model]\nfamily = "analytic"\n'
                   '[space]\nx = { low = -1.0, high = 1.0 }\n')
    result = run_hpo("run", str(bad), "--storage", f"sqlite:///{tmp_path / 'b.db'}", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "b.db").exists()


CLOSE = {"name": "close", "seed": 1, "seeds": {"min": 2, "max": 6},
         "model": {"family": "analytic", "function": "sphere", "noise": 0.5},
         "training": {"max_epochs": 4, "patience": 4}, "pruner": {"kind": "none"},
         "space": {"x": {"low": -3.0, "high": 3.0}}}


def test_an_incumbent_a_challenger_came_close_to_gains_new_seeds_that_later_races_read(tmp_path):
    spec = parse_spec(CLOSE)
    url = f"sqlite:///{tmp_path / 'close.db'}"
    study = create_study(spec, get_storage(url))
    # f(-1) = 1 and f(1.1) = 1.21 with noise 0.5: both challengers race the first trial to
    # seeds max and stay undecided, so each gives it a batch of 2 seeds.
    for x in (-1.0, 1.1, 1.1):
        study.enqueue_trial({"x": x})
    lines: list[str] = []
    run_trials(study, spec, budget=3, echo=lines.append)

    attrs = user_attrs(url, "close")
    first = attrs[0]
    assert first["seeds"] == [1000, 1001] and len(first["seed_scores"]) == 2  # what it was selected on
    # New seeds, continuing its own sequence: none it had, none past seeds max (confirmation's).
    assert first["incumbent_seeds"] == [1002, 1003, 1004, 1005]
    assert first["incumbent_scores"] == pytest.approx(fit_repeats(spec, {"x": -1.0}, [1002, 1003, 1004, 1005]).scores)
    assert len(first["incumbent_curves"]) == len(first["incumbent_best_epochs"]) == 4
    # The second challenger raced (in this process, past Optuna's cache) the incumbent's 4 seeds.
    assert "undecided against incumbent #0 on 2 seeds" in attrs[1]["seed_stop_reason"]
    assert "undecided against incumbent #0 on 4 seeds" in attrs[2]["seed_stop_reason"]
    assert attrs[1]["undecided_against"] == attrs[2]["undecided_against"] == 0
    assert sum("came close to incumbent #0: it gained seeds" in line for line in lines) == 2

    every = first["seed_scores"] + first["incumbent_scores"]
    assert first["all_seeds_mean"] == pytest.approx(statistics.fmean(every))
    assert first["all_seeds_std"] == pytest.approx(statistics.stdev(every))
    assert (first["ci_low"], first["ci_high"]) == pytest.approx(bootstrap_ci(every))
    # Optuna's value stays the selection mean, so its samplers and caches see no change.
    assert study.trials[0].value == pytest.approx(first["mean"])
    row = run_sql("SELECT value, mean, n_seeds, n_added_seeds, ci_low FROM hpo_trials WHERE number = 0", url).iloc[0]
    assert (row["n_seeds"], row["n_added_seeds"]) == (6, 4) and row["mean"] == pytest.approx(first["all_seeds_mean"])
    assert row["value"] == pytest.approx(first["mean"]) and row["ci_low"] == pytest.approx(first["ci_low"])
    top = build_report(url, "close", top=3).top
    assert top.loc[top["number"] == 0, "seed_scores"].iloc[0] == pytest.approx(every, rel=1e-5)
    assert "2+4" in format_report(build_report(url, "close", top=3))

    # The dashboard note was replaced: version 3 after two batches, every seed listed.
    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), study.trials[0]._trial_id)
    assert note["version"] == 3 and "over 6 seeds" in note["body"] and "| 1005 (added) |" in note["body"]
    # At seeds max the incumbent gains no more.
    assert fit_incumbent_seeds(study, spec, 0) is None


def test_one_worker_at_a_time_adds_seeds_to_an_incumbent_and_a_diverged_seed_ends_it(storage_url, monkeypatch):
    spec = parse_spec({**CLOSE, "name": "claimed"})
    study = create_study(spec, get_storage(storage_url))
    study.enqueue_trial({"x": -1.0})
    run_trials(study, spec, budget=1, echo=lambda line: None)
    storage, trial_id = rdb_storage(study._storage), study.trials[0]._trial_id
    key = f"{INCUMBENT_CLAIM_PREFIX}{trial_id}"
    # Another live worker (here: this process) holds the claim: this one skips.
    assert claim_work(storage, study._study_id, key)
    assert fit_incumbent_seeds(study, spec, 0) is None
    assert "incumbent_seeds" not in storage.get_trial_user_attrs(trial_id)
    release_claim(storage, study._study_id, key)
    # A claim left by a worker that died is taken over.
    storage.set_study_system_attr(study._study_id, key, {"by": "no-such-host:1", "at": 0.0})
    assert fit_incumbent_seeds(study, spec, 0).seeds == [1002, 1003]
    assert storage.get_study_system_attrs(study._study_id)[key] is None  # given back when done
    # A new seed that diverges is recorded on the trial, and no worker tries again.
    def diverge(*args, **kwargs):
        raise TrialDiverged("seed 1004: loss is nan at epoch 2")

    monkeypatch.setattr("hpo.train.fit.fit_repeats", diverge)
    with pytest.raises(TrialFailed, match="seed 1004"):
        fit_incumbent_seeds(study, spec, 0)
    assert storage.get_trial_user_attrs(trial_id)["incumbent_fail_reason"] == "seed 1004: loss is nan at epoch 2"
    assert fit_incumbent_seeds(study, spec, 0) is None
