"""The real `hpo` command end to end, on a real SQLite file read back with sqlite3."""

import json
import sqlite3
import statistics
import os
import subprocess
import sys

import optuna
import pytest

from tests.conftest import ROOT, run_hpo


def trials_with_attrs(db):
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT trial_id, number, state FROM trials ORDER BY number").fetchall()
    out = []
    for trial_id, number, state in rows:
        attrs = {k: json.loads(v) for k, v in conn.execute(
            "SELECT key, value_json FROM trial_user_attributes WHERE trial_id = ?", (trial_id,))}
        value = conn.execute("SELECT value FROM trial_values WHERE trial_id = ?", (trial_id,)).fetchone()
        out.append({"number": number, "state": state, "attrs": attrs, "value": value and value[0]})
    conn.close()
    return out


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    db = tmp_path_factory.mktemp("run") / "x.db"
    result = run_hpo("run", "sine_lstm", "--trials", "3", "--seeds", "2", "--max-epochs", "5",
                     "--storage", f"sqlite:///{db}")
    return db, result


def test_run_stores_mean_std_and_every_per_seed_figure(sine_run):
    db, result = sine_run
    trials = trials_with_attrs(db)
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3 and len(trials) == 3
    for t in trials:
        a = t["attrs"]
        assert {"mean", "std", "seed_scores", "seeds", "best_epochs", "epochs_run", "fit_seconds", "compile_seconds", "curves"} <= set(a)
        assert a["seeds"] == [42000, 42001] and len(a["seed_scores"]) == 2
        assert a["mean"] == pytest.approx(statistics.fmean(a["seed_scores"]), rel=1e-12)
        assert a["std"] == pytest.approx(statistics.stdev(a["seed_scores"]), rel=1e-12)
        assert all(1 <= b <= r <= 5 for b, r in zip(a["best_epochs"], a["epochs_run"]))
        for seed_curves, score, best in zip(a["curves"], a["seed_scores"], a["best_epochs"]):
            assert seed_curves["val_loss"][best - 1] == pytest.approx(score)
        if t["state"] == "COMPLETE":
            assert t["value"] == pytest.approx(a["mean"], rel=1e-12)
    assert "best trial #" in result.stdout and "3 complete" in result.stdout.replace("0 pruned", "")


def test_spec_and_metric_names_are_stored_with_the_study(sine_run):
    db, _ = sine_run
    conn = sqlite3.connect(db)
    spec = json.loads(conn.execute("SELECT value_json FROM study_user_attributes WHERE key = 'hpo_spec'").fetchone()[0])
    assert spec["seeds"] == 2 and spec["training"]["max_epochs"] == 5 and spec["model"]["family"] == "lstm"
    names = conn.execute("SELECT value_json FROM study_system_attributes WHERE key LIKE '%metric_names%'").fetchone()
    assert names and "val_loss mean" in names[0]


def test_replay_gives_identical_scores(sine_run):
    db, _ = sine_run
    result = run_hpo("replay", "--study-name", "sine_lstm", "--storage", f"sqlite:///{db}", "1")
    assert result.stdout.strip().endswith("identical"), result.stdout
    # The params as the run summary prints them: the searched ones, name=value.
    first = result.stdout.splitlines()[0]
    assert first.startswith("trial #1 of sine_lstm: units=") and "None" not in first and "{" not in first


def test_a_diverging_trial_fails_alone_and_the_study_goes_on(tmp_path):
    spec = tmp_path / "nan.toml"
    spec.write_text("""
name = "nan"
seeds = 2
trials = 3
[data]
name = "noisy_sine"
n_samples = 120
window = 5
[model]
family = "mlp"
[training]
max_epochs = 3
[sampler]
kind = "grid"
[space]
optimizer = "sgd"
learning_rate = { choices = [10.0, 0.01] }
units = 64
layers = 3
batch_size = 16
""")
    db = tmp_path / "nan.db"
    result = run_hpo("run", str(spec), "--storage", f"sqlite:///{db}")
    trials = trials_with_attrs(db)
    states = sorted(t["state"] for t in trials)
    assert states == ["COMPLETE", "FAIL"], result.stdout  # the grid has two points
    failed = next(t for t in trials if t["state"] == "FAIL")
    assert "became" in failed["attrs"]["fail_reason"] and "seed" in failed["attrs"]["fail_reason"]
    assert "failed" in result.stdout


def test_bad_regions_are_pruned(tmp_path):
    db = tmp_path / "b.db"
    run_hpo("run", "beale", "--trials", "30", "--storage", f"sqlite:///{db}")
    trials = trials_with_attrs(db)
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert len([t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]) == 30
    assert pruned and all("pruned_at_epoch" in t["attrs"] for t in pruned)
    complete = [t["value"] for t in trials if t["state"] == "COMPLETE"]
    assert statistics.median(t["attrs"]["mean"] for t in pruned) > statistics.median(complete)


def test_rerun_tops_up_to_the_budget_and_refuses_a_changed_spec(tmp_path):
    db = f"sqlite:///{tmp_path / 'b.db'}"
    run_hpo("run", "beale", "--trials", "5", "--storage", db)
    run_hpo("run", "beale", "--trials", "8", "--storage", db)
    assert len([t for t in trials_with_attrs(tmp_path / "b.db") if t["state"] in ("COMPLETE", "PRUNED")]) == 8
    changed = run_hpo("run", "beale", "--trials", "9", "--seeds", "5", "--storage", db, check=False)
    assert changed.returncode == 2 and "already exists" in changed.stderr and "--study-name" in changed.stderr


def test_rerunning_a_finished_study_says_its_budget_is_spent_and_how_to_add_trials(tmp_path):
    db = f"sqlite:///{tmp_path / 'f.db'}"
    run_hpo("run", "beale", "--trials", "3", "--storage", db)
    again = run_hpo("run", "beale", "--trials", "3", "--storage", db).stdout
    assert "0 complete, 0 pruned, 0 failed in this run" in again
    assert "the study's budget of 3 trials was spent already; to add trials, run it again with --trials N" in again


def test_help_and_studies_answer_without_tensorflow():
    code = ("import sys\nfrom hpo.cli import main\n"
            "for args in (['--help'], ['run', '--help'], ['studies']):\n    main(args)\n"
            "print('TF LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'NO TF')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().endswith("NO TF") and "sine_lstm" in out and "--max-epochs" in out


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    plain = run_hpo("replay", "--study-name", "nope", "--storage", f"sqlite:///{tmp_path / 'e.db'}", "0", check=False)
    assert plain.returncode != 0 and plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith(f"error: no study database at '{tmp_path / 'e.db'}'")
    debug = run_hpo("--debug", "replay", "--study-name", "nope", "--storage", f"sqlite:///{tmp_path / 'e.db'}", "0",
                    check=False)
    assert "Traceback" in debug.stderr
    # The message is printed once, as the error line, not also as the traceback's last line.
    assert debug.stderr.count(plain.stderr.strip()) == 1 and debug.stderr.strip().endswith(plain.stderr.strip())


def test_topping_up_a_study_does_not_replay_its_first_proposals(tmp_path):
    db = f"sqlite:///{tmp_path / 't.db'}"
    run_hpo("run", "beale", "--trials", "4", "--storage", db)
    run_hpo("run", "beale", "--trials", "8", "--storage", db)
    study = optuna.load_study(study_name="beale", storage=db)
    points = [(t.params["x"], t.params["y"]) for t in study.trials]
    assert len(set(points)) == len(points) == 8


def test_an_unopenable_sqlite_path_is_one_error_line(tmp_path):
    result = run_hpo("run", "beale", "--storage", f"sqlite:///{tmp_path}/no/such/dir/x.db", check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: cannot open storage sqlite:///{tmp_path}/no/such/dir/x.db: unable to open database file: "
        "check the path and its folder's permissions"]


def test_a_single_process_run_restarts_itself_when_memory_grows_and_finishes_the_budget(tmp_path):
    db = tmp_path / "m.db"
    result = run_hpo("run", "sine_lstm", "--trials", "3", "--seeds", "1", "--max-epochs", "1",
                     "--max-memory-growth", "1", "--storage", f"sqlite:///{db}")
    assert "hpo run: memory grew" in result.stdout and "restarting to release it" in result.stdout
    trials = trials_with_attrs(db)
    assert len(trials) == 3 and all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)


@pytest.mark.parametrize("args, option", [
    (["--seeds", "100000"], "--seeds"), (["--max-epochs", "200000"], "--max-epochs"), (["--timeout", "-1"], "--timeout"),
    (["--max-failures", "0"], "--max-failures"), (["--heartbeat-interval", "-5"], "--heartbeat-interval"),
    (["--study-name", " "], "--study-name"),
    (["--grace-period", "5"], "--grace-period"),
])
def test_options_out_of_range_name_the_option_and_create_nothing(tmp_path, args, option):
    db = tmp_path / "o.db"
    result = run_hpo("run", "beale", "--storage", f"sqlite:///{db}", *args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], lines
    assert "beale.toml" not in lines[0] and not db.exists()


@pytest.mark.parametrize("command", [["worker", "--study-name", "x"], ["replay", "--study-name", "x", "0"],
                                     ["report", "--study-name", "x"]])
def test_read_only_commands_on_a_missing_database_create_no_file_and_say_where_they_looked(tmp_path, command):
    db = tmp_path / "missing.db"
    result = run_hpo(*command, "--storage", f"sqlite:///{db}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and str(db) in lines[0], lines
    assert not db.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["report", "--study-name", "x"], ["sql", "SELECT 1"],
                                     ["plot", "--study-name", "x"], ["run", "beale"]])
def test_a_file_that_is_not_a_sqlite_database_is_one_error_line(tmp_path, command):
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"this is not a database" * 100)
    result = run_hpo(*command, "--storage", f"sqlite:///{db}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "not a SQLite database" in lines[0], lines


def test_the_printed_replay_hint_runs_as_printed(tmp_path):
    db = tmp_path / "h.db"
    out = run_hpo("run", "beale", "--trials", "3", "--storage", f"sqlite:///{db}").stdout
    hint = out.split("replay it with: ")[1].strip()
    assert f"--storage sqlite:///{db}" in hint
    assert "identical" in run_hpo(*hint.split()[1:]).stdout


def test_a_damaged_study_database_is_one_error_line_for_every_reader(tmp_path):
    db = tmp_path / "damaged.db"
    run_hpo("run", "beale", "--trials", "3", "--storage", f"sqlite:///{db}")
    with open(db, "r+b") as f:
        f.seek(8192)
        f.write(b"\xff" * 8192)
    for command in (["report", "--study-name", "beale"], ["plot", "--study-name", "beale", "-o", str(tmp_path / "p.png")],
                    ["worker", "--study-name", "beale"]):
        result = run_hpo(*command, "--storage", f"sqlite:///{db}", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: storage sqlite:///{db}") and "corrupt" in lines[0], lines


def test_a_jax_run_never_imports_tensorflow_and_keeps_its_start_up_lines_off_the_terminal(tmp_path):
    # Keras asks whether TensorFlow is installed (set_random_seed, get_config) and asking
    # imports it, on any backend: 3 s and ~450 MB a process, and its oneDNN/CUDA-stub lines
    # go to fd 2 before its log settings apply. `-X importtime` lists every module imported.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpo", "run", "sine_lstm", "--trials", "1",
                             "--seeds", "2", "--max-epochs", "1", "--storage", f"sqlite:///{tmp_path / 'q.db'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "trial    0 complete" in result.stdout, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "keras" in imported and "tensorflow" not in imported
    printed = "\n".join(line for line in lines if not line.startswith("import time:"))
    assert not any(s in printed for s in ("absl", "oneDNN", "cudart_stub")), printed[-2000:]


def test_a_missing_jax_device_is_named_before_any_trial(tmp_path):
    import importlib.util

    # A platform this machine has no plugin for (CUDA here, unless its plugin is installed).
    cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    platform = "rocm" if cuda else "cuda"
    db = tmp_path / "d.db"
    result = run_hpo("run", "sine_lstm", "--storage", f"sqlite:///{db}", env={"JAX_PLATFORMS": platform}, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: JAX cannot start on JAX_PLATFORMS={platform}: ")
    assert "set JAX_PLATFORMS=cpu" in result.stderr and "[model.family]" not in result.stderr
    assert not db.exists()


def readme_queries() -> list[str]:
    """Every SQL query the README shows: its sql blocks, its `hpo sql "..."` lines and the
    standard-library example's query."""
    import re

    text = (ROOT / "README.md").read_text()
    queries = [q.strip() for block in re.findall(r"```sql\n(.*?)```", text, re.S) for q in block.split(";")]
    queries += re.findall(r'^hpo sql "(SELECT [^"]*)"', text, re.M)
    queries += re.findall(r'db\.execute\("""(.*?)"""', text, re.S)
    return [re.sub(r"^--.*$", "", q, flags=re.M).strip() for q in queries if "SELECT" in q]


def test_the_readmes_sql_examples_return_rows_of_their_study_only(sine_run, tmp_path):
    db, _ = sine_run
    alone, shared = tmp_path / "alone.db", tmp_path / "shared.db"
    for copy in (alone, shared):
        with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
            source.backup(target)
    # Another study in the same file, with trial numbers of its own from 0.
    run_hpo("run", "beale", "--trials", "3", "--storage", f"sqlite:///{shared}")
    queries = readme_queries()
    assert len(queries) >= 6
    for query in queries:
        assert "study_name" in query, query
        # The example's trial 12, in this 3-trial study: trial 1.
        query = query.replace("number = 12", "number = 1")
        results = []
        for path in (alone, shared):
            with sqlite3.connect(path) as conn:
                results.append(conn.execute(query).fetchall())
        assert results[0] and results[0] == results[1], query
