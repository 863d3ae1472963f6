import dataclasses
import tomllib
from pathlib import Path

import pytest

from hpo.errors import OptionError, SpecError
from hpo.spec import STUDIES_DIR, FloatRange, IntRange, list_specs, load_spec, parse_spec, spec_to_dict
from tests.conftest import run_hpo

GOOD = """
name = "t"
metric = "val_loss"
[data]
name = "noisy_sine"
[model]
family = "lstm"
[space]
units = { low = 4, high = 16 }
learning_rate = { low = 1e-4, high = 1e-2, log = true }
batch_size = 32
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_studies_load_and_round_trip_through_the_database_form():
    names = [name for name, _ in list_specs()]
    assert {"sine_lstm", "digits_mlp", "sequence_toy", "beale"} <= set(names)
    for name in names:
        spec = load_spec(name)
        again = parse_spec(spec_to_dict(spec), source="db")
        assert dataclasses.replace(again, source=spec.source) == spec


def test_required_vocabulary_in_default_study():
    spec = load_spec("sine_lstm")
    assert {"units", "layers", "dropout", "learning_rate", "batch_size"} <= set(spec.space)
    assert isinstance(spec.space["units"], IntRange) and spec.space["units"].log
    assert isinstance(spec.space["dropout"], FloatRange)


@pytest.mark.parametrize("edit, field, words", [
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\nepochs = 3'), "epochs", "unknown key"),
    (lambda t: t.replace("units = { low = 4, high = 16 }", "units = { low = 64, high = 8 }"),
     "space.units", "low=64 is above high=8; swap them"),
    (lambda t: t.replace('family = "lstm"', 'family = "transformer"'), "model.family", "'lstm'"),
    (lambda t: t.replace("batch_size = 32", "batch_size = 0"), "space.batch_size", "outside 1.."),
    (lambda t: t.replace("units = {", "unitz = {"), "space.unitz", "did you mean 'units'"),
    (lambda t: t.replace('name = "noisy_sine"', 'name = "noisy_sine"\nscaling = "minmax"'), "data.scaling", "'normalize'"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\n[objective]\nmode = "pareto"')
     .replace("[data]", "[pruner]\nkind = \"median\"\n[data]"), "pruner.kind", "cannot prune multi-objective"),
])
def test_malformed_spec_names_file_field_and_fix(tmp_path, edit, field, words):
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    message = str(e.value)
    assert message.startswith(f"spec {path}") or "s.toml" in message
    assert f"[{field}]" in message
    assert words in message


def test_missing_csv_column_is_named_with_the_columns_there(tmp_path):
    csv = write(tmp_path, "t,temp\n1,2.0\n2,3.0\n", "series.csv")
    path = write(tmp_path, GOOD.replace('name = "noisy_sine"', f'name = "csv_series"\npath = "{csv}"\ncolumn = "temperature"'))
    with pytest.raises(SpecError, match=r"\[data.column\] column \"temperature\" is not in .* \(columns: t, temp\)"):
        load_spec(path)


def test_bad_spec_stops_the_real_command_before_any_trial(tmp_path):
    path = write(tmp_path, GOOD.replace("batch_size = 32", "batch_size = 0"))
    db = tmp_path / "x.db"
    result = run_hpo("run", str(path), "--storage", f"sqlite:///{db}", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: spec ") and "[space.batch_size]" in lines[0]
    assert not db.exists()


def test_toml_syntax_error_is_one_clear_line(tmp_path):
    path = write(tmp_path, GOOD + "\nunits = [\n")
    with pytest.raises(SpecError, match="is not valid TOML"):
        load_spec(path)


def test_overrides_apply_and_are_checked():
    spec = load_spec("sine_lstm").with_overrides(seeds=2, max_epochs=5, trials=3)
    assert (spec.seeds, spec.training.max_epochs, spec.trials) == (2, 5, 3)
    assert spec.seed_values == [42000, 42001]
    with pytest.raises(OptionError, match="--seeds 0"):
        spec.with_overrides(seeds=0)


def test_direction_follows_the_metric():
    raw = tomllib.loads(GOOD.replace('metric = "val_loss"', 'metric = "val_accuracy"\ndirection = "minimize"'))
    with pytest.raises(SpecError, match=r"\[direction\] val_accuracy is to maximize"):
        parse_spec(raw, source="x.toml")


def test_every_study_file_in_studies_is_valid():
    for path in STUDIES_DIR.glob("*.toml"):
        assert load_spec(path).name == path.stem


def test_a_table_task_follows_the_output_and_a_conflict_is_refused(tmp_path):
    csv = write(tmp_path, "a,b,label\n1,2,x\n3,4,y\n5,6,x\n", "t.csv")
    base = f'name = "t"\nmetric = "val_accuracy"\n[data]\nname = "csv_table"\npath = "{csv}"\ntarget = "label"\n' \
           '[model]\nfamily = "mlp"\n'
    assert load_spec(write(tmp_path, base)).data.task == "classification"
    with pytest.raises(SpecError, match=r"\[data.task\] task = \"regression\" but the model output is \"classification\""):
        load_spec(write(tmp_path, base.replace('target = "label"', 'target = "label"\ntask = "regression"')))


def test_resampling_a_chronological_split_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace('name = "noisy_sine"', 'name = "noisy_sine"\nresample_split = true'))
    with pytest.raises(SpecError, match=r"\[data.resample_split\] a chronological split is the same"):
        load_spec(path)


def test_a_window_longer_than_the_data_stops_the_command_before_any_trial(tmp_path):
    csv = write(tmp_path, "v\n" + "\n".join(str(i) for i in range(12)), "short.csv")
    path = write(tmp_path, GOOD.replace('name = "noisy_sine"', f'name = "csv_series"\npath = "{csv}"\ncolumn = "v"')
                 + "window = { low = 2, high = 50 }\n")
    db = tmp_path / "w.db"
    result = run_hpo("run", str(path), "--storage", f"sqlite:///{db}", check=False)
    assert result.returncode == 2 and "[space.window] window 50" in result.stderr and not db.exists()


CSV_TABLE = """
name = "table"
[data]
name = "csv_table"
path = "t.csv"
target = "y"
[model]
family = "mlp"
"""


@pytest.mark.parametrize("content, expected", [
    ("\ufeff" + GOOD, "byte-order mark"),
    (GOOD.encode("utf-16"), "binary file"),
    (GOOD.replace('"t"', '"caf\xe9"').encode("latin-1"), "is not UTF-8 text"),
])
def test_a_study_file_that_is_not_plain_utf8_is_one_line(tmp_path, content, expected):
    path = tmp_path / "s.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    result = run_hpo("run", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"a,y\n", "has a header but no rows"),
    ("a,y\n1,caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"y\n1\n2\n", "no column besides the target"),
])
def test_a_bad_csv_is_named_before_any_trial(tmp_path, content, expected):
    (tmp_path / "t.csv").write_bytes(content)
    with pytest.raises(SpecError, match=expected):
        load_spec(write(tmp_path, CSV_TABLE))


def test_a_data_path_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "t.csv").mkdir()
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(write(tmp_path, CSV_TABLE))
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(str(tmp_path))


@pytest.mark.parametrize("bound", ["nan", "inf", "-inf", "1e308"])
@pytest.mark.parametrize("family", ["lstm", "analytic"])
def test_non_finite_or_huge_bounds_are_refused(tmp_path, bound, family):
    text = (GOOD.replace("units = { low = 4, high = 16 }", f"units = {{ low = 4, high = {bound} }}") if family == "lstm"
            else f'name = "b"\n[model]\nfamily = "analytic"\n[space]\nx = {{ low = -1.0, high = {bound} }}\n')
    with pytest.raises(SpecError, match="not a usable bound"):
        load_spec(write(tmp_path, text))


def test_a_step_that_does_not_fit_its_range_is_refused(tmp_path):
    text = GOOD.replace("units = { low = 4, high = 16 }", "units = { low = 4, high = 15, step = 2 }")
    with pytest.raises(SpecError, match=r"\[space.units\] step=2 does not divide the range 4..15"):
        load_spec(write(tmp_path, text))
    assert load_spec(write(tmp_path, GOOD.replace("high = 16 }", "high = 16, step = 4 }"))).space["units"].step == 4


def test_an_empty_study_name_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"\[name\] is empty"):
        load_spec(write(tmp_path, GOOD.replace('name = "t"', 'name = " "')))


def test_a_relative_data_path_is_the_study_files_and_the_spec_is_the_same_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "t.csv").write_text("a,y\n1,2\n3,4\n5,6\n7,8\n9,10\n")
    study = write(tmp_path, CSV_TABLE)
    here = spec_to_dict(load_spec(study))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    there = spec_to_dict(load_spec(study))
    assert here["data"]["path"] == there["data"]["path"] == "t.csv"
    assert {k: v for k, v in here.items() if k != "base_dir"} == {k: v for k, v in there.items() if k != "base_dir"}


def test_a_horizon_too_long_names_the_horizon(tmp_path):
    from hpo.data import check_data

    spec = parse_spec({"name": "h", "data": {"name": "noisy_sine", "n_samples": 60, "window": 5, "horizon": 55},
                       "model": {"family": "lstm"}})
    with pytest.raises(SpecError, match=r"\[data.horizon\] horizon 55"):
        check_data(spec)


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "100000"], "--seeds 100000 is outside 1..1000"),
    (["--max-epochs", "200000"], "--max-epochs 200000 is outside 1..100000"),
    (["--timeout", "-1"], "'--timeout'"),
    (["--max-failures", "0"], "'--max-failures'"),
    (["--heartbeat-interval", "-5"], "'--heartbeat-interval'"),
])
def test_command_line_overrides_keep_the_specs_limits_and_name_the_option(tmp_path, args, expected):
    db = tmp_path / "x.db"
    result = run_hpo("run", "beale", *args, "--storage", f"sqlite:///{db}", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr
    assert "spec " not in result.stderr and not db.exists()
