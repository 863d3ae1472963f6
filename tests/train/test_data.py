import dataclasses

import numpy as np
import pytest

from hpo.specs import DataSpec
from hpo.train.data import load_dataset


def test_noisy_sine_windows_predict_the_clean_value_chronologically():
    spec = DataSpec(name="noisy_sine", n_samples=300, window=10, val_fraction=0.2)
    d = load_dataset(spec)
    n = 300 - 10
    assert d.x_train.shape == (n - 58, 10, 1) and d.x_val.shape == (58, 10, 1)
    assert d.y_train.shape == (n - 58, 1) and d.task == "regression"
    # Chronological: the last training window ends right before the first validation one.
    assert np.allclose(d.x_train[-1, 1:, 0], d.x_val[0, :-1, 0])


def test_scaling_is_fitted_on_the_training_split_only(tmp_path):
    # A series whose validation tail is far larger than its head: if the scaler saw the
    # tail, the training inputs would not be centred on zero.
    values = np.concatenate([np.linspace(0, 1, 80), np.linspace(1000, 2000, 20)])
    csv = tmp_path / "s.csv"
    csv.write_text("v\n" + "\n".join(f"{v}" for v in values))
    spec = DataSpec(name="csv_series", path=str(csv), column="v", window=1, val_fraction=0.2,
                    scaling="standardize", split="chronological")
    d = load_dataset(spec)
    train_inputs = d.x_train[:, 0, 0]
    assert abs(train_inputs.mean()) < 0.1 and abs(train_inputs.std() - 1) < 0.1
    # The first validation input is the last training target; the rest lie far above.
    assert d.x_val[1:].min() > 100
    normalized = load_dataset(dataclasses.replace(spec, scaling="normalize"))
    assert normalized.x_train.min() == pytest.approx(0) and 0.95 < normalized.x_train.max() <= 1


def test_sequence_echo_predicts_the_next_value():
    d = load_dataset(DataSpec(name="sequence_echo", n_samples=100, window=1, scaling="none", split="random"))
    x = np.concatenate([d.x_train, d.x_val])[:, 0, 0]
    y = np.concatenate([d.y_train, d.y_val])[:, 0]
    assert np.allclose(y - x, 0.01, atol=1e-6) and len(x) == 100


def test_digits_ship_offline_as_images_or_rows():
    spec = DataSpec(name="digits", val_fraction=0.25, split="random")
    seq, flat = load_dataset(spec, sequence=True), load_dataset(spec, sequence=False)
    assert seq.x_train.shape[1:] == (8, 8) and flat.x_train.shape[1:] == (64,)
    assert seq.n_outputs == 10 and seq.y_train.dtype == np.int32
    assert len(seq.x_train) + len(seq.x_val) == 1797


def test_split_is_fixed_by_the_split_seed():
    spec = DataSpec(name="digits", split="random")
    a, b, c = (load_dataset(spec, sequence=False, split_seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.y_val, b.y_val) and not np.array_equal(a.y_val, c.y_val)


def test_csv_table_classification_encodes_labels(tmp_path):
    csv = tmp_path / "t.csv"
    rows = [f"{i},{i % 7},{'cat' if i % 2 else 'dog'}" for i in range(50)]
    csv.write_text("a,b,label\n" + "\n".join(rows))
    d = load_dataset(DataSpec(name="csv_table", path=str(csv), target="label", task="classification"),
                     sequence=False)
    assert d.x_train.shape[1] == 2 and d.n_outputs == 2 and set(np.unique(d.y_train)) <= {0, 1}


@pytest.mark.parametrize("rows, spec_fields, field, words", [
    ("text,label\n,a\n,b\n,a\n", {"name": "csv_text", "text_column": "text", "label_column": "label"},
     "data.text_column", 'column "text" of {csv} has no text (every cell is empty)'),
    ("text,label\nhi there,a\nyo,\nhey,b\nho,\n", {"name": "csv_text", "text_column": "text", "label_column": "label"},
     "data.label_column", 'column "label" of {csv} has 2 empty cells (line 3, 5); give every row a label'),
    ("a,label\n1,x\n2,\n3,y\n", {"name": "csv_table", "target": "label", "task": "classification"},
     "data.target", 'column "label" of {csv} has 1 empty cell (line 3); give every row a class'),
])
def test_empty_text_or_label_cells_name_the_column_the_lines_and_the_fix(tmp_path, rows, spec_fields, field, words):
    from hpo.errors import SpecError

    csv = tmp_path / "d.csv"
    csv.write_text(rows)
    with pytest.raises(SpecError) as e:
        load_dataset(DataSpec(path=str(csv), split="random", **spec_fields), sequence=False)
    assert e.value.field == field and words.format(csv=csv) in str(e.value)


def test_loader_class_labels_must_run_from_zero():
    from hpo.train.data import check_arrays
    from hpo.errors import SpecError

    x = np.zeros((20, 3), dtype="float32")
    y = np.arange(20) % 10 + 1  # 1..10
    with pytest.raises(SpecError) as e:
        check_arrays((x, y, x, y), "s.toml", "data.py:load", "classification")
    assert "class labels run from 1 to 10, but must run from 0 to K-1" in str(e.value)
    assert "subtract 1 from y_train and y_val" in str(e.value)
    assert check_arrays((x, y - 1, x, y - 1), "s.toml", "data.py:load", "classification").n_outputs == 10
