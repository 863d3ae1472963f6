import hashlib
import io
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import sqlalchemy
from scipy import stats

from hpo.errors import StudyNotFound
from hpo.reports.diagnosis import GOOD_FIT, OVERFIT, UNDERFIT, diagnose_curves, diagnose_seed, trial_note
from hpo.reports.report import build_report, compare_scores, format_report
from hpo.reports.results import ReadOnlyRefused, run_sql, seed_scores_frame, trials_frame
from hpo.reports.stats import bootstrap_ci
from tests.conftest import run_hpo
from tests.made import add_trial, close, curve_record, make_study

WINNER = [1.0, 1.1, 0.9]
LOSER = [2.0, 2.1, 1.9]


def hpo_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The command's own entry point in this process: same parsing, errors and output as
    the binary without an interpreter start per call (one test per command runs the binary)."""
    from hpo.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_welch_on_a_clear_winner_matches_the_hand_computation():
    t, p, distinguishable, hint = compare_scores(WINNER, LOSER)
    # means 1.0 and 2.0, both variances 0.01: t = -1 / sqrt(0.01/3 + 0.01/3), Welch df = 4
    assert t == pytest.approx(-1 / math.sqrt(0.02 / 3))
    assert p == pytest.approx(2 * stats.t.sf(1 / math.sqrt(0.02 / 3), 4))
    assert p < 0.001 and distinguishable and hint.startswith("distinguishable at 3 seeds")
    # Unequal sizes and spreads: the Welch-Satterthwaite degrees of freedom matter.
    uneven = stats.ttest_ind([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0], equal_var=False)
    assert compare_scores([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0])[:2] == pytest.approx((uneven[0], uneven[1]))


def test_a_tie_says_raise_seeds_with_a_hand_computed_estimate():
    t, p, distinguishable, hint = compare_scores([1.0, 1.2, 0.8], [1.05, 1.25, 0.85])
    assert t == pytest.approx(-0.05 / math.sqrt(0.08 / 3))
    assert p > 0.5 and not distinguishable
    # (1.96 + 0.84)^2 * (0.04 + 0.04) / 0.05^2 = 250.88 -> 251 seeds per trial
    assert "not distinguishable at 3 seeds" in hint and "raise seeds (about 251" in hint
    assert compare_scores([1.0, 1.2, 0.8], [1.1, 0.9, 1.0])[2] is False
    assert "raise seeds" in compare_scores([1.0], [2.0])[3]
    # (1.96 + 0.84)^2 * 0.08 / 0.001^2 seeds is beyond any budget: say they are equal instead
    assert "treat them as equally good" in compare_scores([1.0, 1.2, 0.8], [1.001, 1.201, 0.801])[3]


def test_diagnosis_tells_underfit_overfit_and_good_fit():
    assert diagnose_seed([3, 2, 1, 0.5, 0.2, 0.1], [3, 2.2, 1.5, 1.2, 1.4, 1.7])[0] == OVERFIT
    assert diagnose_seed([3, 2, 1.5, 1.2], [3, 2.2, 1.7, 1.3])[0] == UNDERFIT
    flat = diagnose_seed([1.0, 0.99, 0.98, 0.98], [1.0, 1.0, 0.99, 0.99])
    assert flat[0] == UNDERFIT and "flat and high" in flat[1]
    assert diagnose_seed([3, 1, 0.5, 0.45, 0.44], [3, 1.1, 0.6, 0.58, 0.59])[0] == GOOD_FIT
    two_overfit = [{"loss": [3, 2, 1, 0.1], "val_loss": [3, 2, 1, 2]}] * 2 + [{"loss": [3, 1, 0.5], "val_loss": [3, 1, 0.5]}]
    d = diagnose_curves(two_overfit)
    assert d.verdict == OVERFIT and d.reason.startswith("2 of 3 seeds") and d.per_seed[2] == UNDERFIT


def test_trial_note_lists_every_seed_and_the_diagnosis():
    note = trial_note(7, {"mean": 1.0, "std": 0.1, "seed_scores": WINNER, "seeds": [0, 1, 2],
                          "best_epochs": [3, 4, 5], "epochs_run": [5, 6, 7], "curves": curve_record(WINNER)},
                      metric="val_mae")
    assert "## Trial 7" in note and "val_mae: 1 ± 0.1" in note
    assert "| 1 | 1.1 | 4 | 6 |" in note and "**Diagnosis:**" in note


def test_report_ranks_trials_with_hand_computed_statistics(storage_url):
    study = make_study(storage_url)
    # Without lr, as a conditional param would be; recorded before trials stored an interval.
    add_trial(study, {"act": "relu", "units": 16}, LOSER, stored_ci=False)
    add_trial(study, {"act": "tanh", "units": 64, "lr": 0.001}, WINNER)
    add_trial(study, {"act": "relu", "units": 32, "lr": 0.1}, [3.0, 3.0, float("nan")])

    report = build_report(storage_url, "hand", top=5)
    top = report.top
    assert report.n_complete == 2 and report.direction == "minimize"
    assert top["number"].tolist() == [1, 0] and top["rank"].tolist() == [1, 2]
    assert top.loc[0, "mean"] == pytest.approx(1.0) and top.loc[0, "std"] == pytest.approx(0.1)
    # Percentile bootstrap over 3 seeds: resampled means of {0.9, 1.0, 1.1}; the 2.5% and 97.5%
    # quantiles sit at the mean of 3x0.9+... rounded to the attainable means near the ends.
    assert 0.9 <= top.loc[0, "ci_low"] < 1.0 < top.loc[0, "ci_high"] <= 1.1
    # The view has no interval for the old trial; the report computes it the same way.
    assert trials_frame(storage_url, "hand").set_index("number").loc[0, ["ci_low", "ci_high"]].isna().all()
    assert (top.loc[1, "ci_low"], top.loc[1, "ci_high"]) == pytest.approx(bootstrap_ci(LOSER))
    assert top.loc[0, "params"] == {"act": "tanh", "lr": 0.001, "units": 64}
    assert top.loc[1, "params"] == {"act": "relu", "units": 16}
    assert top.loc[0, "seed_scores"] == WINNER
    assert top.loc[0, "diagnosis"].startswith("good fit")
    c = report.comparison
    assert (c.best, c.runner_up) == (1, 0) and c.distinguishable and c.difference == pytest.approx(1.0)
    text = format_report(report)
    assert "best #1 vs runner-up #0 on selection seeds: difference 1; distinguishable at 3 seeds" in text
    assert c.p_improvement == 1.0 and "#1 beats #0 in 100% of resamples: a clear winner" in text

    with pytest.raises(StudyNotFound, match='no study "nope".*studies there: hand'):
        build_report(storage_url, "nope")


def test_report_of_a_tie_says_so_through_the_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'tie.db'}"
    study = make_study(url, direction="maximize")
    add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, [1.0, 1.2, 0.8])
    add_trial(study, {"act": "tanh", "units": 20, "lr": 0.01}, [1.05, 1.25, 0.85])
    raw = run_hpo("report", "--study-name", "hand", "--storage", url).stdout
    assert max(len(line) for line in raw.splitlines()) <= 120
    out = " ".join(raw.split())  # prose is folded at 120 columns
    assert "best #1 vs runner-up #0" in out and "not distinguishable at 3 seeds" in out and "raise seeds" in out
    assert "the seeds cannot tell them apart" in out
    doc = json.loads(hpo_in_process(capsys, "report", "--study-name", "hand", "--storage", url, "--format", "json")[1])
    assert [t["number"] for t in doc["trials"]] == [1, 0] and doc["comparison"]["welch_p"] > 0.5
    assert 0.5 <= doc["comparison"]["p_improvement"] < 0.75 and doc["comparison"]["distinguishable"] is False
    # Real JSON types, not strings: arrays of numbers, objects of params, null for no confirmation.
    first = doc["trials"][0]
    assert first["seed_scores"] == [1.05, 1.25, 0.85] and first["params"] == {"act": "tanh", "lr": 0.01, "units": 20}
    assert first["confirmation"] is None and isinstance(doc["expected_best"], list)
    md = hpo_in_process(capsys, "report", "--study-name", "hand", "--storage", url, "--format", "markdown")[1]
    assert md.startswith("## study hand") and "| rank | trial |" in md


def test_frames_and_sql_agree_with_the_stored_trials(storage_url):
    study = make_study(storage_url)
    add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, LOSER)
    add_trial(study, {"act": "tanh", "units": 64, "lr": 0.001}, WINNER)
    trials = trials_frame(storage_url, "hand")
    assert trials["mean"].tolist() == pytest.approx([2.0, 1.0])
    seeds = seed_scores_frame(storage_url, "hand")
    assert seeds.groupby("number")["score"].apply(list).to_dict() == {0: LOSER, 1: WINNER}
    frame = run_sql("SELECT p.value AS act, avg(t.mean) AS mean FROM hpo_trials t JOIN hpo_trial_params p "
                    "ON p.trial_id = t.trial_id AND p.param_name = 'act' GROUP BY p.value ORDER BY p.value",
                    storage_url)
    assert frame.to_dict("records") == [{"act": "relu", "mean": pytest.approx(2.0)},
                                        {"act": "tanh", "mean": pytest.approx(1.0)}]


def test_sql_command_formats(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    add_trial(make_study(url), {"act": "relu", "units": 16, "lr": 0.01}, WINNER)
    query = "SELECT number, mean, n_seeds FROM hpo_trials"
    csv = pd.read_csv(io.StringIO(hpo_in_process(capsys, "sql", query, "--storage", url, "--format", "csv")[1]))
    assert csv.to_dict("records") == [{"number": 0, "mean": pytest.approx(1.0), "n_seeds": 3}]
    assert json.loads(hpo_in_process(capsys, "sql", query, "--storage", url, "--format", "json")[1])[0]["n_seeds"] == 3
    table = run_hpo("sql", query, "--storage", url).stdout.splitlines()
    assert table[0].split() == ["number", "mean", "n_seeds"] and table[1].split() == ["0", "1", "3"]


WRITES = [
    "INSERT INTO studies (study_name) VALUES ('x')",
    "UPDATE trials SET state = 'FAIL'",
    "DELETE FROM trial_user_attributes",
    "DROP VIEW hpo_trials",
    "DROP TABLE trials",
    "CREATE TABLE evil (a INTEGER)",
    "ATTACH DATABASE '{dir}/attached.db' AS other",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = WAL",
    "VACUUM",
    "VACUUM INTO '{dir}/copy.db'",
]


def test_every_kind_of_write_is_refused_and_the_file_is_unchanged(tmp_path, capsys):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study = make_study(url)
    add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, WINNER)
    close(study)
    run_hpo("sql", "SELECT 1", "--storage", url)  # views are in place; from here on nothing may change
    before = sha256(db)
    binary = run_hpo("sql", WRITES[0], "--storage", url, check=False)
    assert binary.returncode == 1 and binary.stderr.startswith("error: refused: hpo sql is read-only")
    for statement in WRITES:
        statement = statement.format(dir=tmp_path)
        code, _, err = hpo_in_process(capsys, "sql", statement, "--storage", url)
        assert code == 1, statement
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: refused: hpo sql is read-only"), (statement, lines)
        assert sha256(db) == before, statement
    # A read of a WAL database may leave SQLite's shared-memory index and an empty WAL
    # beside it; nothing else, and nothing written.
    assert {p.name for p in tmp_path.iterdir()} <= {"study.db", "study.db-shm", "study.db-wal"}
    wal = tmp_path / "study.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert run_sql("PRAGMA table_info(trials)", url)["name"].tolist()[:2] == ["trial_id", "number"]


def test_postgresql_refuses_writes_even_after_ending_the_transaction(postgres):
    url = postgres.create_database()
    add_trial(make_study(url), {"act": "relu", "units": 16, "lr": 0.01}, WINNER)
    for statement in ["INSERT INTO studies (study_name) VALUES ('x')", "DROP VIEW hpo_trials",
                      "WITH d AS (DELETE FROM trial_values RETURNING 1) SELECT count(*) FROM d"]:
        with pytest.raises(ReadOnlyRefused):
            run_sql(statement, url)
    with pytest.raises(Exception, match="multiple commands"):
        run_sql("COMMIT; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; "
                "INSERT INTO studies (study_name) VALUES ('x')", url)
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM studies")).scalar() == 1
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM trial_values")).scalar() == 1
    engine.dispose()


def test_sql_and_report_import_no_tensorflow(tmp_path):
    url = f"sqlite:///{tmp_path / 'i.db'}"
    add_trial(make_study(url), {"act": "relu", "units": 16, "lr": 0.01}, WINNER)
    for args in (["sql", "SELECT * FROM hpo_trials"], ["report", "--study-name", "hand"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpo", *args, "--storage", url],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
        assert "pandas" in imported and not any(m.split(".")[0] in ("tensorflow", "keras") for m in imported)


def test_readers_take_the_storages_only_study_when_none_is_named(tmp_path):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    add_trial(make_study(url), {"act": "relu", "units": 16, "lr": 0.01}, [1.0, 1.2, 0.8])
    assert "study hand: 1 complete trial" in run_hpo("report", "--storage", url).stdout
    make_study(url, name="other")
    result = run_hpo("report", "--storage", url, check=False)
    assert result.returncode != 0
    assert "--study-name is needed: this storage holds 2 studies: hand, other" in result.stderr


@pytest.fixture
def close_call(tmp_path):
    """Three complete trials, #0 ahead of #1 in most resamples but not by Welch's test,
    and a pruned trial (#3) whose partial score beats them both (seen: conv1d_loader)."""
    url = f"sqlite:///{tmp_path / 'close.db'}"
    study = make_study(url)
    add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, [1.0, 1.2, 0.8])
    add_trial(study, {"act": "tanh", "units": 20, "lr": 0.01}, [1.2, 1.4, 1.0])
    add_trial(study, {"act": "tanh", "units": 40, "lr": 0.01}, [2.0, 2.2, 1.8])
    add_trial(study, {"act": "relu", "units": 30, "lr": 0.02}, [0.5, 0.6, 0.7], pruned_at=13)
    add_trial(study, {"act": "relu", "units": 31, "lr": 0.02}, [3.0, 3.1, 3.2], pruned_at=4)
    return url


def test_report_shows_pruned_trials_apart_and_says_when_one_beats_the_best(close_call):
    out = run_hpo("report", "--study-name", "hand", "--storage", close_call).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120
    # Pruned trials are not in the ranking; they have a table of their own, best first.
    ranking = out.split("pruned trials (2)")[0]
    assert "study hand: 3 complete trials" in ranking and not any(l.split()[1:2] == ["3"] for l in ranking.splitlines()[3:6])
    table = out.split("pruned trials (2)")[1].splitlines()
    assert table[1].split()[:4] == ["trial", "pruned", "after", "epoch"]
    assert table[2].split()[:3] == ["3", "13", "0.6"] and table[3].split()[:3] == ["4", "4", "3.1"]
    words = " ".join(out.split())
    assert ("pruned trial #3 reached 0.6 by epoch 13, better than the best complete trial #0 (1): "
            "the pruner stopped a trial that was ahead") in words
    assert "pruned trial #4" not in words
    doc = json.loads(run_hpo("report", "--study-name", "hand", "--storage", close_call, "--format", "json").stdout)
    assert [(p["number"], p["pruned_at_epoch"]) for p in doc["pruned"]] == [(3, 13), (4, 4)]
    assert doc["pruned"][0]["partial_score"] == pytest.approx(0.6)


def test_report_words_a_close_call_plainly_and_folds_between_clauses(close_call):
    out = run_hpo("report", "--study-name", "hand", "--storage", close_call).stdout
    words = " ".join(out.split())
    # Seen: "but that many seeds cannot confirm it".
    assert "but with 3 seeds per trial Welch's test cannot confirm the difference (p = 0.29): no clear winner yet" in words
    # Seen after 3 of 12 trials: "more trials would add little".
    assert "more trials would add little" not in words and "more trials would likely help" not in words
    assert "3 complete trials are too few to tell whether more trials would help" in words
    # Seen: the 120-column fold split "raise" from "seeds".
    assert any("raise seeds (about" in line for line in out.splitlines())
    for line in out.splitlines():
        assert not line.rstrip().endswith(("raise", "Welch's", "Welch")), line


def test_wide_report_shows_every_missing_value_the_same_way(close_call):
    out = run_hpo("report", "--study-name", "hand", "--storage", close_call, "--wide").stdout
    assert "NaN" not in out and "None" not in out
    md = run_hpo("report", "--study-name", "hand", "--storage", close_call, "--wide", "--format", "markdown").stdout
    assert "NaN" not in md and "None" not in md


def test_a_mistyped_study_name_is_bad_input_with_a_suggestion(close_call, tmp_path, capsys):
    result = run_hpo("report", "--study-name", "hnad", "--storage", close_call, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: no study "hnad" in this storage (did you mean \'hand\'?); '
                                     'studies there: hand')
    for command in (["plot", "--study-name", "hnad", "-o", str(tmp_path / "p.png")], ["replay", "--study-name", "hnad", "0"],
                    ["confirm", "--study-name", "hnad"], ["worker", "--study-name", "hnad"]):
        code, out, err = hpo_in_process(capsys, *command, "--storage", close_call)
        assert code == 2 and "(did you mean 'hand'?)" in err and len(err.strip().splitlines()) == 1, (command, err)
    assert not (tmp_path / "p.png").exists()


def test_a_one_seed_analytic_study_reads_in_the_singular_and_is_not_diagnosed_as_a_fit(tmp_path):
    study = tmp_path / "one.toml"
    study.write_text('name = "one"\nseeds = 1\ntrials = 3\n[model]\nfamily = "analytic"\nfunction = "sphere"\n'
                     '[training]\nmax_epochs = 3\n[pruner]\nkind = "none"\n[space]\nx = { low = -1.0, high = 1.0 }\n')
    url = f"sqlite:///{tmp_path / 'one.db'}"
    run = run_hpo("run", str(study), "--storage", url).stdout
    # Seen: "1 seeds each", "(1 seeds, ...)", "0.5 ± 0".
    assert "3 trials, 1 seed each, up to 3 epochs" in run and "(1 seed, analytic" in run
    assert "seeds" not in run.replace("hpo", "") and "± 0" not in run
    report = run_hpo("report", "--storage", url, "--wide").stdout + run_hpo("report", "--storage", url).stdout
    assert "± 0" not in report and "good fit" not in report and "no fit" in report
