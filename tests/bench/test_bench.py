"""`hpo bench` through the real command, on a tiny configuration (no timing assertions)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from hpo.bench.seeds import BenchResult, BenchRow, format_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["lstm", "conv1d"])
def test_bench_json_through_the_hpo_command(model):
    proc = subprocess.run(
        [sys.executable, "-m", "hpo", "bench", "--seeds", "2", "--format", "json", "--epochs", "2",
         "--samples", "120", "--model", model],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["seeds"] == [2]
    for key in ("single_fit_s", "sequential_s", "vectorized_s", "repeat_s", "epoch_s", "peak_rss_mb",
                "ratio_vectorized_to_single", "ratio_repeat_to_single"):
        assert len(result[key]) == 1 and result[key][0] > 0, key
    ratio = result["vectorized_s"][0] / result["single_fit_s"][0]
    assert result["ratio_vectorized_to_single"][0] == pytest.approx(ratio, rel=1e-3)
    # A repeated shape reuses the compiled epoch: it pays no compilation again.
    assert result["repeat_s"][0] < result["vectorized_s"][0]
    config = result["config"]
    assert config["model"] == model and config["epochs"] == 2 and config["early_stopping"] is False
    assert config["backend"] == "jax" and config["device"] == "cpu"  # not "cpu: cpu"
    import jax
    import keras

    assert config["versions"] == f"keras {keras.__version__}, jax {jax.__version__}"


def test_bench_rejects_a_bad_seed_list():
    proc = subprocess.run([sys.executable, "-m", "hpo", "bench", "--seeds", "1,x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--seeds" in proc.stderr


def test_table_shows_a_row_per_seed_count_and_dashes_for_skipped_sequential_fits():
    result = BenchResult(config={"model": "lstm", "device": "cpu"}, rows=[
        BenchRow(1, 2.0, 1.0, 0.5, 0.4, 0.01, 0.03, 500.0),
        BenchRow(5, 2.0, 2.5, 1.5, 0.9, 0.02, 0.07, 600.0, 10.0)])
    lines = format_table(result).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[:4] == ["1", "2.00", "s", "-"]
    assert "1.25x" in lines[2] and "5.00x" in lines[2] and "0.75x" in lines[2]
    assert "lstm on cpu" in lines[3]


def test_the_tables_columns_are_the_readmes():
    import re

    head = format_table(BenchResult(config={}, rows=[BenchRow(1, 2.0, 1.0, 0.5, 0.4, 0.01, 0.03, 500.0)]))
    names = re.split(r"\s{2,}", head.splitlines()[0].strip())
    readme = (ROOT / "README.md").read_text()
    tables = re.findall(r"^\| (?:model, )?seeds \|.*$", readme, re.M)
    assert len(tables) >= 2
    for table in tables:
        columns = [c.strip().strip("*") for c in table.strip("|").split("|")]
        assert set(columns) - {"model, seeds"} <= set(names), columns


def test_bench_study_splits_a_real_runs_wall_time_into_its_parts(tmp_path):
    # The real command on a tiny default study: every trial of the run is listed as the
    # database stored it, and compiling, epochs, the database and the rest add up to the
    # wall time; an empty cache of its own means the first trial compiles.
    proc = subprocess.run(
        [sys.executable, "-m", "hpo", "bench-study", "sine_lstm", "--trials", "2", "--seeds", "2", "--max-epochs", "2",
         "--format", "json"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HPO_CACHE_DIR": str(tmp_path / "user-cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert [t["number"] for t in result["trials"]] == [0, 1]
    assert {t["state"] for t in result["trials"]} <= {"COMPLETE", "PRUNED"}
    for t in result["trials"]:
        assert 0 <= t["compile_s"] <= t["fit_s"] <= t["seconds"]
        # Compiled by the trial itself, or ahead on a second thread while the one before trained.
        assert t["compile_s"] > 0 or (t["prepared_s"] or 0) > 0, t
    assert result["trials"][0]["compile_s"] > 0 and result["trials"][0]["prepared_s"] is None
    assert result["compile_s"] == pytest.approx(sum(t["compile_s"] for t in result["trials"]))
    parts = result["compile_s"] + result["epochs_s"] + result["database_s"] + result["ahead_wait_s"] + result["rest_s"]
    assert parts == pytest.approx(result["wall_s"])
    assert result["database_s"] > 0 and result["rest_s"] > 0
    assert result["cache"] == "empty at the start"
    complete = [t["fit_s"] for t in result["trials"] if t["state"] == "COMPLETE"]
    pruned = [t["fit_s"] for t in result["trials"] if t["state"] == "PRUNED"]
    assert result["median_complete_fit_s"] == (pytest.approx(statistics.median(complete)) if complete else None)
    assert result["median_pruned_fit_s"] == (pytest.approx(statistics.median(pruned)) if pruned else None)
    assert not (tmp_path / "user-cache").exists()  # the user's cache was left alone
    assert "trial    1 complete" in proc.stderr or "trial    1 pruned" in proc.stderr


def test_bench_peers_runs_every_tool_on_one_budget_and_hpo_picks_what_the_native_loop_picks(tmp_path):
    # The real command, every tool, a tiny budget. hpo's replicas are each seed's own
    # model.fit, so the hand-written Optuna loop on JAX (same sampler, same seeds) scores
    # the same trials the same and picks hpo's pick; every pick is refitted on fresh seeds.
    proc = subprocess.run(
        [sys.executable, "-m", "hpo", "bench-peers", "csv_lstm", "--trials", "2", "--seeds", "2", "--max-epochs", "2",
         "--refit-seeds", "2", "--format", "json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    runs = {r["tool"]: r for r in result["runs"]}
    assert list(runs) == ["hpo", "optuna-jax", "optuna-tensorflow", "keras-tuner"]
    for run in runs.values():
        assert run["trials"] == 2 and run["fits"] == 4 and run["seconds"] > 0
        assert set(run["params"]) == {"units", "dropout", "learning_rate", "batch_size"}
        assert len(run["refit"]) == 2 and all(v > 0 for v in run["refit"])
    hpo, loop = runs["hpo"], runs["optuna-jax"]
    assert loop["params"] == hpo["params"]
    assert loop["value"] == pytest.approx(hpo["value"], rel=1e-5)
    assert loop["refit"] == hpo["refit"] and loop["p_vs_hpo"] is None
    assert result["refit_seeds"] and not set(result["refit_seeds"]) & {7000, 7001}  # no training seed
    assert list(tmp_path.iterdir()) == []  # nothing left behind in the folder it ran in


@pytest.mark.parametrize("args, says", [
    (["beale"], "bench-peers: an analytic study trains no Keras model"),
    (["--tools", "hpo,sklearn"], "unknown tool sklearn"),
])
def test_bench_peers_refuses_what_it_cannot_compare_in_one_line(tmp_path, args, says):
    proc = subprocess.run([sys.executable, "-m", "hpo", "bench-peers", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []
