import dataclasses
import tomllib
from pathlib import Path

import pytest

from hpo.errors import OptionError, SpecError
from hpo.specs import STUDIES_DIR, FloatRange, IntRange, list_specs, load_spec, parse_spec, spec_to_dict
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
    (lambda t: t.replace('family = "lstm"', 'famly = "lstm"'), "model.family",
     "is missing ('famly' is not a key here: a misspelling of family?)"),
    (lambda t: t.replace('name = "noisy_sine"', 'name = "noisy_sine"\nscaling = "minmax"'), "data.scaling", "'normalize'"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\n[objective]\nmode = "pareto"')
     .replace("[data]", "[pruner]\nkind = \"median\"\n[data]"), "pruner.kind", "cannot prune multi-objective"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\nseeds = { min = 2, max = 6 }\n[objective]\n'
                         'mode = "pareto"'), "seeds", "no single incumbent"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\nseeds = { min = 1, max = 6 }'),
     "seeds.min", "needs 2 seeds or more; set min = 2 or more"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\nseeds = {}'),
     "seeds.min", "is missing; adaptive seeds take both bounds, e.g. seeds = { min = 3, max = 15 }; or write seeds = 3"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\nseeds = { min = 4 }'),
     "seeds.max", "is missing; adaptive seeds take both bounds"),
    (lambda t: t.replace('metric = "val_loss"', 'metric = "val_loss"\nseeds = "five"'),
     "seeds", "expected a whole number (seeds = 5), or seeds = { min = 3, max = 15 }"),
])
def test_malformed_spec_names_file_field_and_fix(tmp_path, edit, field, words):
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    message = str(e.value)
    assert message.startswith(f"spec {path}") or "s.toml" in message
    assert f"[{field}]" in message
    assert words in message


def test_an_unknown_key_is_told_the_keys_users_write_not_those_hpo_stores():
    with pytest.raises(SpecError) as e:
        parse_spec(tomllib.loads(GOOD.replace('metric = "val_loss"', 'metric = "val_loss"\nbase = 3')), source="s.toml")
    assert "known keys here: " in str(e.value) and "metric" in str(e.value) and "base_dir" not in str(e.value)


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
    with pytest.raises(OptionError, match="option --seeds: 0 is outside"):
        spec.with_overrides(seeds=0)
    with pytest.raises(OptionError, match="option --seeds: 100000 is outside 1..1000"):
        spec.with_overrides(seeds=100000)


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


BEALE = """name = "b"
[model]
family = "analytic"
[space]
x = { low = -4.5, high = 4.5 }
y = { low = -4.5, high = 4.5 }
"""


@pytest.mark.parametrize("content, words", [
    (b"\xef\xbb\xbf" + BEALE.encode(), "byte-order mark"),
    (BEALE.replace('"b"', '"b\xe9"').encode("latin-1"), "not UTF-8"),
    (b"\x00\x01\x02binary", "binary file"),
    (BEALE.replace('name = "b"', 'name = ""').encode(), "[name] is empty"),
    (BEALE.replace("high = 4.5 }", "high = nan }", 1).encode(), "not a finite number"),
    (BEALE.replace("high = 4.5 }", "high = inf }", 1).encode(), "not a finite number"),
    (BEALE.replace("low = -4.5", "low = -1e308", 1).encode(), "not a finite number within"),
    (BEALE.replace("high = 4.5 }", "high = 4.5, step = 2.0 }", 1).encode(), "step 2.0 does not divide"),
    (BEALE.replace("y = { low = -4.5, high = 4.5 }", "y = { choices = [1.0, nan] }").encode(), "not a finite number"),
])
def test_unreadable_or_unusable_study_files_are_refused_naming_the_fault(tmp_path, content, words):
    path = tmp_path / "s.toml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert words in str(e.value)


def test_a_directory_as_study_file_says_it_is_a_directory(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


@pytest.mark.parametrize("csv_bytes, target, words", [
    (b"", "v", "is empty"),
    (b"v,w\n", "v", "header but no data rows"),
    ("v,w\n1,caf\xe9\n".encode("latin-1"), "v", "not UTF-8"),
    (b"label\nx\ny\n", "label", "no feature columns"),
    (None, "v", "is a directory"),
])
def test_bad_csv_files_are_refused_naming_the_fault(tmp_path, csv_bytes, target, words):
    csv = tmp_path / "d.csv"
    if csv_bytes is None:
        csv.mkdir()
    else:
        csv.write_bytes(csv_bytes)
    text = (f'name = "t"\nmetric = "val_accuracy"\n[data]\nname = "csv_table"\npath = "d.csv"\ntarget = "{target}"\n'
            '[model]\nfamily = "mlp"\n')
    path = write(tmp_path, text, "t.toml")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert words in str(e.value) and "window" not in str(e.value)


def test_a_relative_data_path_is_read_from_the_study_folder_and_stored_the_same_from_anywhere(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    write(folder, "a,b,label\n1,2,x\n3,4,y\n5,6,x\n", "t.csv")
    path = write(folder, 'name = "t"\nmetric = "val_accuracy"\n[data]\nname = "csv_table"\npath = "t.csv"\n'
                         'target = "label"\n[model]\nfamily = "mlp"\n', "t.toml")
    monkeypatch.chdir(folder)
    here = spec_to_dict(load_spec("t.toml"))
    monkeypatch.chdir(tmp_path)
    there = spec_to_dict(load_spec(path))
    # Stored relative to the study file: the same on another machine with a copy of the folder.
    assert here["data"]["path"] == there["data"]["path"] == "t.csv"
    assert here == there


def test_a_horizon_too_long_for_the_data_names_the_horizon(tmp_path):
    from hpo.train.data import check_data

    csv = write(tmp_path, "v\n" + "\n".join(str(i) for i in range(30)), "short.csv")
    path = write(tmp_path, GOOD.replace('name = "noisy_sine"', f'name = "csv_series"\npath = "{csv}"\ncolumn = "v"\n'
                                                                 'horizon = 40'))
    with pytest.raises(SpecError) as e:
        check_data(load_spec(path))
    assert e.value.field == "data.horizon" and "shorten the horizon" in str(e.value)


def test_a_study_file_that_is_a_dangling_link_a_link_loop_or_a_fifo_is_called_so(tmp_path):
    import os

    dangling, loop, fifo = tmp_path / "dangling.toml", tmp_path / "loop.toml", tmp_path / "fifo.toml"
    dangling.symlink_to(tmp_path / "gone.toml")
    loop.symlink_to(loop)
    os.mkfifo(fifo)
    for path, words in ((dangling, f"is a symbolic link to {tmp_path / 'gone.toml'}, which does not exist"),
                        (loop, "is a symbolic link that loops"), (fifo, "is a FIFO (named pipe), not a regular file")):
        with pytest.raises(SpecError) as e:
            load_spec(path)
        assert words in str(e.value) and "give the path of a .toml study file" in str(e.value)
        assert "no such study file" not in str(e.value)
    # Through the real command: one line, exit 2, and no wait for a writer on the FIFO.
    result = run_hpo("run", str(fifo), "--storage", f"sqlite:///{tmp_path / 'x.db'}", check=False, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is a FIFO" in result.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("make, words", [
    (lambda csv: csv.symlink_to(csv), "is a symbolic link that loops"),
    (lambda csv: __import__("os").mkfifo(csv), "is a FIFO (named pipe), not a regular file"),
])
def test_a_data_path_in_a_link_loop_or_a_fifo_is_called_so(tmp_path, make, words):
    make(tmp_path / "d.csv")
    text = ('name = "t"\nmetric = "val_accuracy"\n[data]\nname = "csv_table"\npath = "d.csv"\ntarget = "v"\n'
            '[model]\nfamily = "mlp"\n')
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text, "t.toml"))
    assert e.value.field == "data.path" and words in str(e.value) and "does not exist" not in str(e.value)


def test_a_shipped_study_run_from_another_folder_names_the_file_it_read(tmp_path, monkeypatch):
    monkeypatch.chdir(STUDIES_DIR.parent)
    assert load_spec("sine_lstm").source == "studies/sine_lstm.toml"
    result = run_hpo("create", "sine_lstm", "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path)
    assert f"study sine_lstm ({STUDIES_DIR / 'sine_lstm.toml'}) ready" in result.stdout
