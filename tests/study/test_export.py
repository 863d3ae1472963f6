"""hpo export end to end: a real `hpo run` of a user-built model, the real `hpo export` in
a subprocess, the saved files loaded in a fresh process and scored on the study's
validation split against what the study stored; bad inputs refused in one line."""

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, run_hpo
from tests.test_api import notebook_env, run_notebook

STUDY = "conv1d_csv"

LOAD = """
import json
import sys
from pathlib import Path

import keras
from hpo.study.export import validation_split

storage, number, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
x, y, batch_size = validation_split(storage, "conv1d_csv", number)
out = {}
for path in sorted(folder.glob("*.keras")):
    model = keras.saving.load_model(path)
    out[path.name] = {"score": model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)["loss"],
                      "predictions": model.predict(x[:8], verbose=0).ravel().tolist()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """A tiny real run of the Conv1D study (a user build function) in a copy of its folder."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "study" / "data").mkdir(parents=True)
    for name in (f"{STUDY}.toml", "user_model.py", "data/series.csv"):
        shutil.copy(ROOT / "studies" / name, folder / "study" / name)
    db = folder / "x.db"
    url = f"sqlite:///{db}"
    run_hpo("run", str(folder / "study" / f"{STUDY}.toml"), "--trials", "2", "--seeds", "2", "--max-epochs", "3",
            "--storage", url)
    return folder, url


def stored_scores(url, number):
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    value = conn.execute("SELECT a.value_json FROM trial_user_attributes a JOIN trials t USING (trial_id) "
                         "WHERE t.number = ? AND a.key = 'seed_scores'", (number,)).fetchone()[0]
    seeds = conn.execute("SELECT a.value_json FROM trial_user_attributes a JOIN trials t USING (trial_id) "
                         "WHERE t.number = ? AND a.key = 'seeds'", (number,)).fetchone()[0]
    conn.close()
    return dict(zip(json.loads(seeds), json.loads(value)))


def test_exported_models_score_in_a_fresh_process_what_the_study_stored(study_run):
    folder, url = study_run
    out = folder / "models"
    result = run_hpo("export", "--study-name", STUDY, "--storage", url, "-o", str(out), "--ensemble")
    number = int(result.stdout.split("trial #")[1].split()[0])
    # The winner by default: the best objective value (no confirmation ran).
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    best = conn.execute("SELECT t.number FROM trials t JOIN trial_values v USING (trial_id) "
                        "WHERE t.state = 'COMPLETE' ORDER BY v.value LIMIT 1").fetchone()[0]
    conn.close()
    assert number == best
    stored = stored_scores(url, number)
    names = [f"trial{number}-seed{s}.keras" for s in stored] + [f"trial{number}-ensemble.keras"]
    # All the files, and nothing else (no temporary file left behind).
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    ensemble_line = next(line for line in result.stdout.splitlines() if line.startswith("ensemble of 2 seeds"))
    printed = float(ensemble_line.split("val_loss ")[1].split()[0])
    assert "per-seed mean" in ensemble_line

    load = folder / "load.py"
    load.write_text(LOAD)
    fresh = subprocess.run([sys.executable, str(load), url, str(number), str(out)], capture_output=True, text=True,
                           timeout=600, cwd=folder, env={**notebook_env(), "KERAS_BACKEND": "jax"})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    for seed, score in stored.items():
        assert loaded[f"trial{number}-seed{seed}.keras"]["score"] == pytest.approx(score, abs=1e-6, rel=1e-6)
    ensemble = loaded[f"trial{number}-ensemble.keras"]
    assert ensemble["score"] == pytest.approx(printed, rel=1e-5)
    # The ensemble is the mean of its seeds' outputs, not one of them.
    members = [loaded[f"trial{number}-seed{s}.keras"]["predictions"] for s in stored]
    assert ensemble["predictions"] == pytest.approx([sum(p) / len(p) for p in zip(*members)], abs=1e-5)
    assert members[0] != pytest.approx(members[1], abs=1e-4)


def test_best_models_returns_the_chosen_seeds_model_at_its_best_epoch(study_run):
    import hpo
    from hpo.study.export import validation_split

    folder, url = study_run
    stored = stored_scores(url, 1)
    seed = list(stored)[1]
    models = hpo.best_models(url, STUDY, trial=1, seed=seed)
    assert len(models) == 1
    x, y, batch_size = validation_split(url, STUDY, 1)
    score = models[0].evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)["loss"]
    assert score == pytest.approx(stored[seed], abs=1e-6, rel=1e-6)


def add_finished_trial(url, state):
    study = optuna.load_study(study_name=STUDY, storage=url)
    trial = study.ask()
    if state == TrialState.FAIL:
        trial.set_user_attr("fail_reason", "ValueError: boom")
    study.tell(trial, state=state)
    return trial.number


BAD = {
    "no complete trial": (["--study-name", "empty"], "has no complete trial to export"),
    "pruned trial": (["--trial", "{pruned}"], "was pruned"),
    "failed trial": (["--trial", "{failed}"], "failed (ValueError: boom)"),
    "seed not used": (["--seed", "5"], "not 5; give one of those"),
    "one file for two seeds": (["-o", "{folder}/one.keras"], "holds one model but the trial has 2 seeds"),
    "folder not writable": (["-o", "/sys/hpo-models"], "cannot write in folder /sys"),
    "build changed": (["--study-dir", "{changed}"], "differs from the code this study's trials were fitted with"),
}


def test_bad_exports_are_one_line_exit_2_and_write_nothing(study_run):
    folder, url = study_run
    run_hpo("create", str(folder / "study" / f"{STUDY}.toml"), "--study-name", "empty", "--storage", url)
    pruned, failed = add_finished_trial(url, TrialState.PRUNED), add_finished_trial(url, TrialState.FAIL)
    changed = folder / "changed"
    shutil.copytree(folder / "study", changed)
    (changed / "user_model.py").write_text((changed / "user_model.py").read_text() + "\n# edited\n")
    recorded = hashlib.sha256((folder / "study" / "user_model.py").read_bytes()).hexdigest()[:12]
    found = hashlib.sha256((changed / "user_model.py").read_bytes()).hexdigest()[:12]
    before = sorted(p.name for p in folder.iterdir())
    for case, (args, message) in BAD.items():
        args = [a.format(pruned=pruned, failed=failed, folder=folder, changed=changed) for a in args]
        if "--study-name" not in args:
            args += ["--study-name", STUDY]
        if "-o" not in args:
            args += ["-o", str(folder / "out")]
        result = run_hpo("export", "--storage", url, *args, check=False)
        assert result.returncode == 2, (case, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (case, result.stderr)
        assert message in result.stderr, (case, result.stderr)
        if case == "build changed":
            assert recorded in result.stderr and found in result.stderr
        assert sorted(p.name for p in folder.iterdir()) == before, case


TUNE = """
import json

import numpy as np
import hpo
import keras


def build(params, input_shape, n_outputs):
    inputs = keras.Input(input_shape)
    x = keras.layers.Dense(params["units"], activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(n_outputs)(x))


rng = np.random.default_rng(0)
x = rng.normal(size=(160, 4)).astype("float32")
y = (x @ np.array([1.0, -2.0, 0.5, 0.0], dtype="float32"))[:, None]
study = hpo.tune(build, data=(x[:120], y[:120], x[120:], y[120:]),
                 space={"units": (4, 16), "learning_rate": (1e-3, 1e-2, "log"), "batch_size": 32},
                 seeds=2, trials=2, storage="sqlite:///{db}", study_name="mine", max_epochs=2)
print("=== tuned")
models = hpo.best_models("sqlite:///{db}", "mine")
scores = [m.evaluate(x[120:], y[120:], batch_size=32, verbose=0, return_dict=True)["loss"] for m in models]
print("SCORES", json.dumps({"got": scores, "stored": study.best_trial.user_attrs["seed_scores"]}))
report = hpo.report(study)
page = report._repr_html_()
print("HTML", "<table" in page, page.count('src="data:image/png;base64,'))
print("TEXT", repr(report).splitlines()[0])
"""


def test_tune_prints_its_summary_without_optunas_log_and_its_models_and_report_follow(tmp_path):
    _, out = run_notebook(tmp_path, TUNE, "t.db")
    summary = out.stdout.split("=== tuned")[0]
    assert "done in" in summary and "best trial #" in summary and "params: units=" in summary
    assert 'hpo.best_models(' in summary
    # Optuna's own INFO lines ("[I 2026-...] A new study created in RDB ...") stay quiet.
    assert "A new study created" not in out.stdout + out.stderr and "[I " not in out.stdout + out.stderr
    scores_line = next(line for line in out.stdout.splitlines() if line.startswith("SCORES"))
    scores = json.loads(scores_line.removeprefix("SCORES "))
    assert scores["got"] == pytest.approx(scores["stored"], abs=1e-6, rel=1e-6)
    assert "HTML True 3" in out.stdout
    assert "TEXT study mine: 2 complete trials" in out.stdout


def test_the_default_trial_is_the_confirmed_winner_once_hpo_confirm_ran(study_run):
    from hpo.study.export import plan_export

    folder, url = study_run
    run_hpo("confirm", "--study-name", STUDY, "--storage", url, "--top", "2", "--seeds", "2")
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    confirmed = conn.execute("SELECT t.number FROM trials t JOIN trial_user_attributes a USING (trial_id) "
                             "JOIN studies s USING (study_id) WHERE s.study_name = ? AND a.key = 'confirm_mean' "
                             "ORDER BY CAST(a.value_json AS REAL) LIMIT 1", (STUDY,)).fetchone()[0]
    conn.close()
    plan = plan_export(url, STUDY)
    assert plan.confirmed and plan.trial.number == confirmed
