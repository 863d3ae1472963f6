"""The [data] table: a built-in dataset, a CSV file (its columns checked) or the user's loader in, a `DataSpec` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpo.errors import SpecError, did_you_mean
from hpo.specs.model import OUTPUTS
from hpo.specs.table import Table, hook_sha256, read_text_file, why_not_a_file


DATASETS = ("noisy_sine", "sequence_echo", "digits", "csv_series", "csv_table", "csv_text")
# The dataset of a study whose [data] names the user's own `loader` function.
LOADER = "loader"
SERIES_DATASETS = ("noisy_sine", "sequence_echo", "csv_series")
SCALINGS = ("none", "normalize", "standardize")
SPLITS = ("chronological", "random")


@dataclass(frozen=True)
class DataSpec:
    name: str = "noisy_sine"
    path: str | None = None
    column: str | None = None
    features: tuple[str, ...] | None = None
    target: str | None = None
    task: str = "regression"
    window: int = 20
    horizon: int = 1
    n_samples: int = 1000
    noise: float = 0.1
    val_fraction: float = 0.2
    split: str | None = None
    scaling: str = "standardize"
    resample_split: bool = False
    text_column: str | None = None
    label_column: str | None = None
    maxlen: int = 50
    vocab_size: int = 2000
    loader: str | None = None
    loader_sha256: str | None = None


    @property
    def effective_split(self) -> str:
        """The split the spec asks for; forecast series (noisy_sine, csv_series) keep time
        order unless told otherwise, the echo toy and tables split at random."""
        return self.split or ("chronological" if self.name in ("noisy_sine", "csv_series") else "random")


def parse_data(t: "Table", base_dir: Path | None, check_files: bool = True) -> DataSpec:
    loader = t.str("loader", default=None)
    if loader is not None:
        return _parse_loader(t, loader, base_dir)
    name = t.str("name", required=True)
    t.choice("name", name, DATASETS)
    path = t.str("path", default=None)
    if name in ("csv_series", "csv_table", "csv_text"):
        if path is None:
            raise SpecError(t.source, f"{t.prefix}path", f'dataset "{name}" needs path = "file.csv"; add it')
        if check_files:
            path = _portable_path(t, path, base_dir)
    features = t.get("features", None)
    if features is not None:
        if not (isinstance(features, list) and all(isinstance(f, str) for f in features) and features):
            raise SpecError(t.source, f"{t.prefix}features", f"expected a list of column names, got {features!r}")
        features = tuple(features)
    spec = DataSpec(
        name=name,
        path=path,
        column=t.str("column", default=None),
        features=features,
        target=t.str("target", default=None),
        task=t.str("task", default="regression"),
        window=t.int("window", default=20 if name != "sequence_echo" else 1, low=1, high=10_000),
        horizon=t.int("horizon", default=1, low=1, high=10_000),
        n_samples=t.int("n_samples", default=1000 if name != "sequence_echo" else 100, low=10, high=10_000_000),
        noise=t.float("noise", default=0.1, low=0.0, high=1e6),
        val_fraction=t.float("val_fraction", default=0.2, low=0.01, high=0.9),
        split=t.str("split", default=None),
        scaling=t.str("scaling", default="standardize" if name != "sequence_echo" else "none"),
        resample_split=t.bool("resample_split", default=False),
        text_column=t.str("text_column", default=None),
        label_column=t.str("label_column", default=None),
        maxlen=t.int("maxlen", default=50, low=1, high=100_000),
        vocab_size=t.int("vocab_size", default=2000, low=3, high=10_000_000),
    )
    t.choice("task", spec.task, OUTPUTS)
    if spec.split is not None:
        t.choice("split", spec.split, SPLITS)
    t.choice("scaling", spec.scaling, SCALINGS)
    if name == "csv_series" and not spec.column:
        raise SpecError(t.source, f"{t.prefix}column", 'dataset "csv_series" needs column = "name of the series column"; add it')
    if name == "csv_table" and not spec.target:
        raise SpecError(t.source, f"{t.prefix}target", 'dataset "csv_table" needs target = "name of the target column"; add it')
    if name == "csv_text":
        for key in ("text_column", "label_column"):
            if not getattr(spec, key):
                raise SpecError(t.source, f"{t.prefix}{key}", f'dataset "csv_text" needs {key} = "name of the column"; add it')
    if name in ("csv_series", "csv_table", "csv_text") and check_files:
        _check_csv_columns(t, spec, base_dir)
    t.finish()
    return spec


def resolve_data_path(path: str, base_dir: str | Path | None) -> Path:
    """A data file's path as stored (relative to the study file's folder, or absolute)
    on this machine."""
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def _portable_path(t: "Table", path: str, base_dir: Path | None) -> str:
    # Relative paths are the study file's folder's; stored relative to it, the spec is
    # the same from any working directory and on any machine with a copy of the folder.
    found = resolve_data_path(path, base_dir)
    if found.is_dir():
        raise SpecError(t.source, f"{t.prefix}path", f"{found} is a directory, not a CSV file; name the file inside it")
    unusable = why_not_a_file(found)
    if unusable:
        raise SpecError(t.source, f"{t.prefix}path", f"{found} {unusable}; point path at the CSV file itself")
    if not found.is_file():
        raise SpecError(t.source, f"{t.prefix}path", f"CSV file {found} does not exist; fix the path (relative paths "
                                                     "are read from the study file's folder)")
    if base_dir is not None:
        try:
            return found.resolve().relative_to(Path(base_dir).resolve()).as_posix()
        except ValueError:
            pass
    return str(found.resolve())


def _parse_loader(t: "Table", loader: str, base_dir: Path | None) -> DataSpec:
    name = t.str("name", default=LOADER)
    if name != LOADER:
        raise SpecError(t.source, f"{t.prefix}name", f'a [data] table with loader = "..." takes no name (got "{name}"); '
                                                     "remove one of them")
    sha = hook_sha256(t, "loader", loader, base_dir)
    spec = DataSpec(name=LOADER, loader=loader, loader_sha256=sha, scaling="none",
                    task=t.str("task", default="regression"))
    t.choice("task", spec.task, OUTPUTS)
    t.finish()
    return spec


def _check_csv_columns(t: "Table", spec: DataSpec, base_dir: Path | None) -> None:
    import csv
    import io

    path = resolve_data_path(spec.path, base_dir)
    text = read_text_file(path, t.source, f"{t.prefix}path", "CSV file")
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, [])
    if not any(h.strip() for h in header):
        raise SpecError(t.source, f"{t.prefix}path", f"{path} is empty; it needs a header line and data rows")
    if not any(any(cell.strip() for cell in row) for row in rows):
        raise SpecError(t.source, f"{t.prefix}path", f"{path} has a header but no data rows; add the data")
    if spec.name == "csv_table" and not spec.features and not [h for h in header if h != spec.target]:
        raise SpecError(t.source, f"{t.prefix}target", f'"{spec.target}" is the only column of {path}, which '
                                                       "leaves no feature columns; add feature columns to the file")
    wanted = {"csv_series": [("column", spec.column)], "csv_table": [("target", spec.target)],
              "csv_text": [("text_column", spec.text_column), ("label_column", spec.label_column)]}[spec.name]
    wanted += [("features", c) for c in spec.features or ()]
    for key, col in wanted:
        if col not in header:
            raise SpecError(t.source, f"{t.prefix}{key}", f'column "{col}" is not in {path} '
                                                          f"(columns: {', '.join(header)}){did_you_mean(col, header)}")
