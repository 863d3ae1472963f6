"""Study spec: a TOML file under `studies/` in, a validated frozen `StudySpec` out.

Everything a worker needs to run a study is here, checked once before any trial starts;
`spec_to_dict`/`parse_spec` round-trip it through the study database for remote workers.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from hpo.errors import OptionError, SpecError
from hpo.errors import did_you_mean as _did_you_mean

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"

FAMILIES = ("lstm", "gru", "simple_rnn", "mlp", "analytic")
# The family of a study whose [model] names the user's own `build` function.
CUSTOM = "custom"
RECURRENT_FAMILIES = ("lstm", "gru", "simple_rnn")
OUTPUTS = ("regression", "classification")
DATASETS = ("noisy_sine", "sequence_echo", "digits", "csv_series", "csv_table", "csv_text")
# The dataset of a study whose [data] names the user's own `loader` function.
LOADER = "loader"
SERIES_DATASETS = ("noisy_sine", "sequence_echo", "csv_series")
SCALINGS = ("none", "normalize", "standardize")
SPLITS = ("chronological", "random")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "successive_halving", "percentile", "none")
BACKENDS = ("jax", "tensorflow")
OBJECTIVE_MODES = ("mean", "mean+k*std", "pareto")
ANALYTIC_FUNCTIONS = ("beale", "rosenbrock", "sphere")
METRICS = {
    "val_loss": "minimize",
    "val_mae": "minimize",
    "val_mse": "minimize",
    "val_accuracy": "maximize",
}

# Range bounds beyond this are refused: Optuna computes high - low (infinite for ±1e308,
# which crashed the sampler outside any trial); 1e100 leaves a wide margin.
MAX_BOUND = 1e100
# Limits of the study-wide counts, shared with the command-line options that override them.
MAX_SEEDS = 1000
MAX_EPOCHS = 100_000
MAX_TRIALS = 10**7

# The search-space vocabulary of the built-in families, with the value used when the
# spec leaves a name out.
DEFAULT_PARAMS: dict[str, Any] = {
    "units": 32,
    "layers": 1,
    "dropout": 0.0,
    "recurrent_dropout": 0.0,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "optimizer": "adam",
    "momentum": 0.0,
    "nesterov": False,
    "lr_schedule": "constant",
    "lr_decay": 0.0,
    "l1": 0.0,
    "l2": 0.0,
    "initializer": "glorot_uniform",
    "activation": "tanh",
    "clipnorm": 0.0,
    "window": None,
    "maxlen": None,
    "vocab_size": None,
    "embedding_dim": 16,
}
CHOICES = {
    "optimizer": ("adam", "rmsprop", "sgd"),
    "lr_schedule": ("constant", "time", "exponential"),
    "initializer": ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal", "orthogonal"),
    "activation": ("tanh", "relu", "elu", "selu", "sigmoid", "gelu", "swish"),
    "nesterov": (True, False),
}
# name -> (lowest allowed, highest allowed, must be int)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "units": (1, 4096, True),
    "layers": (1, 16, True),
    "dropout": (0.0, 0.99, False),
    "recurrent_dropout": (0.0, 0.99, False),
    "learning_rate": (1e-8, 10.0, False),
    "batch_size": (1, 1 << 16, True),
    "momentum": (0.0, 0.999, False),
    "lr_decay": (0.0, 100.0, False),
    "l1": (0.0, 10.0, False),
    "l2": (0.0, 10.0, False),
    "clipnorm": (0.0, 1e6, False),
    "window": (1, 10_000, True),
    "maxlen": (1, 100_000, True),
    "vocab_size": (3, 10_000_000, True),
    "embedding_dim": (1, 100_000, True),
}
# Vocabulary names that shape the data rather than the model.
DATA_PARAMS = ("window", "maxlen", "vocab_size")


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclass(frozen=True)
class Fixed:
    value: Any


Param = Union[IntRange, FloatRange, Choice, Fixed]


@dataclass(frozen=True)
class ObjectiveSpec:
    mode: str = "mean"
    k: float = 1.0


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


@dataclass(frozen=True)
class ModelSpec:
    family: str = "lstm"
    output: str | None = None
    stateful: bool = False
    function: str = "beale"
    noise: float = 0.0
    # Analytic family only: wall-clock seconds each epoch sleeps, standing in for training
    # time when testing or demonstrating workers (crashes, restarts). None: no sleep.
    epoch_seconds: float | None = None
    # The user's `build(params, input_shape, n_outputs)`, and the sha256 of its code.
    build: str | None = None
    build_sha256: str | None = None


@dataclass(frozen=True)
class TrainingSpec:
    max_epochs: int = 30
    patience: int = 5
    min_delta: float = 0.0
    # None: HPO_BACKEND, else hpo's default (backend.py).
    backend: str | None = None
    # A Keras loss name; None: the output kind's (mse, sparse categorical cross-entropy).
    loss: str | None = None
    # "best": a seed's score is its best epoch's (early stopping); "last": its final epoch's,
    # as in experiments that train a fixed number of epochs and report where they ended.
    score: str = "best"


@dataclass(frozen=True)
class ConfirmSpec:
    """Refit the `top` trials on `seeds` fresh seeds when the budget is spent (top = 0: off)."""

    top: int = 0
    seeds: int = 10


@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "tpe"
    seed: int | None = None
    n_startup_trials: int = 10


@dataclass(frozen=True)
class PrunerSpec:
    kind: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 2
    percentile: float = 25.0
    min_resource: int = 1
    reduction_factor: int = 3


@dataclass(frozen=True)
class StudySpec:
    """A whole study, validated. Build it with `load_spec` or `parse_spec`."""

    name: str
    description: str = ""
    metric: str = "val_loss"
    direction: str = "minimize"
    seeds: int = 3
    seed: int = 0
    trials: int = 20
    # Adaptive seeds: a trial starts with `seeds` and may grow to `seeds_max` while it
    # cannot be told from the incumbent (None: always exactly `seeds`).
    seeds_max: int | None = None
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    space: dict[str, Param] = field(default_factory=dict)
    source: str = "<memory>"
    # The study file's folder on the machine that made the spec: hooks are resolved
    # against it, or against a worker's own copy of the folder (`--study-dir`).
    base_dir: str | None = None

    @property
    def seed_values(self) -> list[int]:
        """The seeds each trial fits, derived from the study seed."""
        return [self.seed * 1000 + i for i in range(self.seeds)]

    @property
    def output(self) -> str:
        return self.model.output or ("classification" if self.metric == "val_accuracy" else "regression")

    @property
    def is_multi_objective(self) -> bool:
        return self.objective.mode == "pareto"

    @property
    def directions(self) -> list[str]:
        if self.is_multi_objective:
            return [self.direction, "minimize"]
        return [self.direction]

    @property
    def metric_names(self) -> list[str]:
        if self.objective.mode == "pareto":
            return [f"{self.metric} mean", f"{self.metric} std"]
        if self.objective.mode == "mean+k*std":
            sign = "+" if self.direction == "minimize" else "-"
            return [f"{self.metric} mean {sign} {self.objective.k:g}*std"]
        return [f"{self.metric} mean"]

    def with_overrides(self, *, seeds: int | None = None, max_epochs: int | None = None,
                       trials: int | None = None, name: str | None = None) -> "StudySpec":
        """Return a copy with command-line overrides applied and checked against the limits
        a study file has.

        Raises:
            OptionError: An override outside its limits, naming the option.
        """
        spec = self
        for option, value, high in (("--seeds", seeds, MAX_SEEDS), ("--max-epochs", max_epochs, MAX_EPOCHS),
                                    ("--trials", trials, MAX_TRIALS)):
            if value is not None and not 1 <= value <= high:
                # The option is at fault, not the study file.
                raise OptionError(option, f"{value} is outside 1..{high}; choose a value in that range")
        if seeds is not None:
            spec = dataclasses.replace(spec, seeds=seeds, seeds_max=None)
        if max_epochs is not None:
            spec = dataclasses.replace(spec, training=dataclasses.replace(spec.training, max_epochs=max_epochs))
        if trials is not None:
            spec = dataclasses.replace(spec, trials=trials)
        if name is not None:
            if not name.strip():
                raise OptionError("--study-name", "is empty; give the study a name")
            spec = dataclasses.replace(spec, name=name)
        return spec


def find_spec_file(name_or_path: str) -> Path:
    """Resolve `sine_lstm`, `studies/sine_lstm.toml` or any path to an existing file."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        raise SpecError(name_or_path, "", "is a directory, not a study file; give the path of a .toml file")
    unusable = why_not_a_file(candidate)
    if unusable:
        raise SpecError(name_or_path, "", f"{unusable}; give the path of a .toml study file")
    for path in (STUDIES_DIR / f"{name_or_path}.toml", Path("studies") / f"{name_or_path}.toml"):
        if path.is_file():
            return path
    known = sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))
    hint = _did_you_mean(name_or_path, known)
    raise SpecError(name_or_path, "", f"no such study file or study name; known studies: {', '.join(known)}{hint}")


def load_spec(name_or_path: str | Path) -> StudySpec:
    """Read and validate a study file (a path, or a name from `studies/`)."""
    path = find_spec_file(str(name_or_path))
    source = _display_path(path)
    try:
        raw = tomllib.loads(read_text_file(path, source, "", "study file"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(source, "", f"is not valid TOML: {e}; fix the syntax") from e
    return parse_spec(raw, source=source, base_dir=path.resolve().parent)


def why_not_a_file(path: Path) -> str | None:
    """Why an existing name cannot be read as a regular file (a dangling symbolic link or a
    loop of them, a FIFO, a socket, a device); None when it is a file, a directory, or
    nothing at all (the caller names those)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device")
    # Reading a FIFO would wait for a writer for ever.
    return f"is {kind}, not a regular file"


def read_text_file(path: Path, source: str, field: str, what: str) -> str:
    """A UTF-8 text file's content (TOML and our CSV reading need UTF-8, without a BOM).

    Raises:
        SpecError: `path` is a directory, unreadable, binary, not UTF-8 or starts with a
            byte-order mark; naming `source` and `field`.
    """
    if path.is_dir():
        raise SpecError(source, field, f"{path} is a directory, not a {what}; give the path of the file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(source, field, f"cannot read {path}: {e.strerror}; fix the path or its permissions") from e
    if data.startswith(b"\xef\xbb\xbf"):
        raise SpecError(source, field, f"{path} starts with a byte-order mark (BOM); save it as UTF-8 without BOM")
    if b"\0" in data:
        raise SpecError(source, field, f"{path} is a binary file, not a {what}; give the path of a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(source, field, f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                                       "save it as UTF-8") from e


def list_specs() -> list[tuple[str, str]]:
    """(name, description) of every study file shipped in `studies/`."""
    rows = []
    for path in sorted(STUDIES_DIR.glob("*.toml")):
        try:
            raw = tomllib.loads(path.read_text())
            lines = str(raw.get("description", "")).strip().splitlines()
            rows.append((path.stem, lines[0] if lines else ""))
        except (tomllib.TOMLDecodeError, OSError) as e:
            rows.append((path.stem, f"(unreadable: {e})"))
    return rows


def parse_spec(raw: dict[str, Any], *, source: str = "<memory>", base_dir: Path | None = None,
               check_files: bool = True) -> StudySpec:
    """Validate a spec dict (as read from TOML or from the study database).

    Hooks (`[model] build`, `[data] loader`) are resolved against `base_dir` (the study
    file's folder; else the stored one) and their code hashed, unless the dict already
    records the hash (a spec read back from a study: checked when a worker loads the code).
    A data file's path is kept relative to the study file's folder, so the spec is the same
    whatever the working directory; `check_files=False` (a spec read back from a study, on
    a machine that may not hold the files) skips reading them.
    """
    top = _Table(raw, source, "")
    name = top.str("name", required=True)
    if not name.strip():
        raise SpecError(source, "name", 'is empty; name the study, e.g. name = "my_study"')
    description = top.str("description", default="")
    stored_dir = top.str("base_dir", default=None)
    if base_dir is None and stored_dir is not None:
        base_dir = Path(stored_dir)
    model = _parse_model(top.table("model"), base_dir)
    analytic = model.family == "analytic"
    metric = top.str("metric", default="value" if analytic else "val_loss")
    if analytic:
        if metric != "value":
            raise SpecError(source, "metric", f'the analytic family reports "value", got "{metric}"; set metric = "value"')
        natural = "minimize"
    else:
        top.choice("metric", metric, tuple(METRICS))
        natural = METRICS[metric]
    direction = top.str("direction", default=natural)
    top.choice("direction", direction, ("minimize", "maximize"))
    if direction != natural:
        raise SpecError(source, "direction", f'{metric} is to {natural}, got direction = "{direction}"; '
                                             f'set direction = "{natural}" or leave it out')
    seeds, seeds_max = _parse_seeds(top)
    seed = top.int("seed", default=0, low=0, high=2**31 - 1)
    trials = top.int("trials", default=20, low=1, high=MAX_TRIALS)
    objective = _parse_objective(top.table("objective"))
    data = DataSpec() if analytic else _parse_data(top.table("data"), base_dir, check_files)
    if analytic:
        top.table("data").finish()
    training = _parse_training(top.table("training"))
    sampler = _parse_sampler(top.table("sampler"), seed)
    pruner_table = top.table("pruner")
    pruner = _parse_pruner(pruner_table, default_kind="none" if objective.mode == "pareto" else "median")
    if objective.mode == "pareto" and pruner.kind != "none":
        raise SpecError(source, "pruner.kind", 'objective mode "pareto" has two objectives and Optuna cannot prune '
                                               'multi-objective trials; set [pruner] kind = "none"')
    if objective.mode == "pareto" and seeds_max is not None:
        raise SpecError(source, "seeds", 'objective mode "pareto" has no single incumbent for adaptive seeds to race '
                                         f'against; set a fixed count, e.g. seeds = {seeds_max}')
    space = _parse_space(top.table("space"), model.family)
    output = model.output or _natural_output(data, metric)
    if model.family == CUSTOM and data.name == LOADER and model.output is None and metric != "val_accuracy":
        output = "regression"
    model = dataclasses.replace(model, output=output)
    if data.name == "csv_table":
        explicit_task = isinstance(raw.get("data"), dict) and "task" in raw["data"]
        if explicit_task and data.task != output:
            raise SpecError(source, "data.task", f'task = "{data.task}" but the model output is "{output}"; '
                                                 "make them agree (or leave task out: it follows the output)")
        data = dataclasses.replace(data, task=output)
    if data.resample_split and data.effective_split == "chronological":
        raise SpecError(source, "data.resample_split", "a chronological split is the same for every seed; "
                                                       'set split = "random" or resample_split = false')
    if not analytic:
        _check_consistency(source, data, model, metric, space)
    if sampler.kind == "grid":
        for pname, p in space.items():
            if isinstance(p, FloatRange) and p.step is None:
                raise SpecError(source, f"space.{pname}", "the grid sampler needs a finite grid; give a step or a list of choices")
    confirm = _parse_confirm(top.table("confirm"))
    top.finish()
    return StudySpec(name=name, description=description, metric=metric, direction=direction, seeds=seeds,
                     seeds_max=seeds_max, confirm=confirm, seed=seed, trials=trials, objective=objective, data=data,
                     model=model, training=training, sampler=sampler, pruner=pruner, space=space, source=source,
                     base_dir=None if base_dir is None else str(base_dir))


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """The spec as a TOML-shaped dict that `parse_spec` accepts (stored with the study)."""
    def section(obj: Any) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(obj).items() if v is not None}

    out: dict[str, Any] = {
        "name": spec.name, "description": spec.description, "metric": spec.metric,
        "direction": spec.direction, "seed": spec.seed, "trials": spec.trials,
        "seeds": spec.seeds if spec.seeds_max is None else {"min": spec.seeds, "max": spec.seeds_max},
        "confirm": section(spec.confirm),
        "objective": section(spec.objective), "model": section(spec.model),
        "training": section(spec.training), "sampler": section(spec.sampler), "pruner": section(spec.pruner),
        "space": {name: param_to_raw(p) for name, p in spec.space.items()},
    }
    if spec.model.family == CUSTOM:
        out["model"] = {k: v for k, v in out["model"].items() if k in ("build", "build_sha256", "output")}
    if spec.model.family != "analytic":
        out["data"] = section(spec.data)
        if spec.data.name == LOADER:
            out["data"] = {k: v for k, v in out["data"].items() if k in ("loader", "loader_sha256", "task")}
    if spec.base_dir is not None:
        out["base_dir"] = spec.base_dir
    return out


def param_to_raw(p: Param) -> Any:
    """One parameter of a space as a study file writes it."""
    if isinstance(p, Fixed):
        return {"value": p.value}
    if isinstance(p, Choice):
        return {"choices": list(p.choices)}
    raw = {"low": p.low, "high": p.high, "log": p.log}
    if p.step is not None:
        raw["step"] = p.step
    return raw


def _natural_output(data: DataSpec, metric: str) -> str:
    if data.name in ("digits", "csv_text") or metric == "val_accuracy":
        return "classification"
    if data.name == "csv_table":
        return data.task
    return "regression"


def _parse_objective(t: "_Table") -> ObjectiveSpec:
    mode = t.str("mode", default="mean")
    t.choice("mode", mode, OBJECTIVE_MODES)
    k = t.float("k", default=1.0, low=0.0, high=100.0)
    t.finish()
    return ObjectiveSpec(mode=mode, k=k)


def _parse_data(t: "_Table", base_dir: Path | None, check_files: bool = True) -> DataSpec:
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


def _portable_path(t: "_Table", path: str, base_dir: Path | None) -> str:
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


def _hook_sha256(t: "_Table", key: str, ref: str, base_dir: Path | None) -> str | None:
    # A spec read back from a study carries the hash it was created with (checked when a
    # worker loads the code); a study file gets the hash of the code found now.
    from hpo.spec.hooks import code_hash

    sha = t.str(f"{key}_sha256", default=None)
    return code_hash(ref, base_dir, t.source, f"{t.prefix}{key}") if sha is None else sha


def _parse_loader(t: "_Table", loader: str, base_dir: Path | None) -> DataSpec:
    name = t.str("name", default=LOADER)
    if name != LOADER:
        raise SpecError(t.source, f"{t.prefix}name", f'a [data] table with loader = "..." takes no name (got "{name}"); '
                                                     "remove one of them")
    sha = _hook_sha256(t, "loader", loader, base_dir)
    spec = DataSpec(name=LOADER, loader=loader, loader_sha256=sha, scaling="none",
                    task=t.str("task", default="regression"))
    t.choice("task", spec.task, OUTPUTS)
    t.finish()
    return spec


def _check_csv_columns(t: "_Table", spec: DataSpec, base_dir: Path | None) -> None:
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
                                                          f"(columns: {', '.join(header)}){_did_you_mean(col, header)}")


def _parse_model(t: "_Table", base_dir: Path | None) -> ModelSpec:
    build = t.str("build", default=None)
    if build is not None:
        return _parse_build(t, build, base_dir)
    family = t.str("family", required=True)
    t.choice("family", family, FAMILIES)
    output = t.str("output", default=None)
    if output is not None:
        t.choice("output", output, OUTPUTS)
    spec = ModelSpec(
        family=family,
        output=output,
        stateful=t.bool("stateful", default=False),
        function=t.str("function", default="beale"),
        noise=t.float("noise", default=0.0, low=0.0, high=1e6),
        epoch_seconds=t.float("epoch_seconds", default=None, low=0.0, high=3600.0) if "epoch_seconds" in t.raw else None,
    )
    if family == "analytic":
        t.choice("function", spec.function, ANALYTIC_FUNCTIONS)
    elif spec.epoch_seconds is not None:
        raise SpecError(t.source, f"{t.prefix}epoch_seconds", 'only the analytic family sleeps per epoch; remove epoch_seconds')
    if spec.stateful and family != "lstm":
        raise SpecError(t.source, f"{t.prefix}stateful", 'stateful models are LSTMs; set family = "lstm" or stateful = false')
    t.finish()
    return spec


def _parse_build(t: "_Table", build: str, base_dir: Path | None) -> ModelSpec:
    family = t.str("family", default=CUSTOM)
    if family != CUSTOM:
        raise SpecError(t.source, f"{t.prefix}family", f'[model] names both family = "{family}" and build = "{build}"; '
                                                       "keep one of them")
    output = t.str("output", default=None)
    if output is not None:
        t.choice("output", output, OUTPUTS)
    sha = _hook_sha256(t, "build", build, base_dir)
    t.finish()
    return ModelSpec(family=CUSTOM, output=output, build=build, build_sha256=sha)


def _parse_training(t: "_Table") -> TrainingSpec:
    spec = TrainingSpec(
        max_epochs=t.int("max_epochs", default=30, low=1, high=MAX_EPOCHS),
        patience=t.int("patience", default=5, low=0, high=100_000),
        min_delta=t.float("min_delta", default=0.0, low=0.0, high=1e9),
        backend=t.str("backend", default=None),
        loss=t.str("loss", default=None),
        score=t.str("score", default="best"),
    )
    if spec.backend is not None:
        t.choice("backend", spec.backend, BACKENDS)
    t.choice("score", spec.score, ("best", "last"))
    t.finish()
    return spec


def _parse_seeds(top: "_Table") -> tuple[int, int | None]:
    """`seeds = 5` (fixed) or `seeds = { min = 3, max = 15 }` (adaptive): (min, max or None)."""
    if not isinstance(top.raw.get("seeds"), dict):
        return top.int("seeds", default=3, low=1, high=MAX_SEEDS), None
    t = top.table("seeds")
    given = set(t.raw)
    low = t.int("min", default=3, low=1, high=MAX_SEEDS)
    high = t.int("max", default=low, low=1, high=MAX_SEEDS)
    t.finish()
    for key in ("min", "max"):
        if key not in given:
            # Else `seeds = {}` would quietly mean 3 fixed seeds.
            raise SpecError(top.source, f"seeds.{key}", "is missing; adaptive seeds take both bounds, e.g. "
                                                        "seeds = { min = 3, max = 15 }; or write seeds = 3 for a "
                                                        "fixed count")
    if high < low:
        raise SpecError(top.source, "seeds.max", f"max = {high} is below min = {low}; set max >= min")
    if high > low and low < 2:
        # A race at one seed would never start: Welch's test needs two scores a side.
        raise SpecError(top.source, "seeds.min", f"adaptive seeds test each trial against the best by Welch's "
                                                 f"test, which needs 2 seeds or more; set min = 2 or more")
    return low, (high if high > low else None)


def _parse_confirm(t: "_Table") -> ConfirmSpec:
    spec = ConfirmSpec(top=t.int("top", default=0, low=0, high=1000),
                       seeds=t.int("seeds", default=10, low=2, high=1000))
    t.finish()
    return spec


def _parse_sampler(t: "_Table", study_seed: int) -> SamplerSpec:
    kind = t.str("kind", default="tpe")
    t.choice("kind", kind, SAMPLERS)
    spec = SamplerSpec(kind=kind, seed=t.int("seed", default=study_seed, low=0, high=2**31 - 1),
                       n_startup_trials=t.int("n_startup_trials", default=10, low=0, high=100_000))
    t.finish()
    return spec


def _parse_pruner(t: "_Table", default_kind: str) -> PrunerSpec:
    kind = t.str("kind", default=default_kind)
    t.choice("kind", kind, PRUNERS)
    spec = PrunerSpec(
        kind=kind,
        n_startup_trials=t.int("n_startup_trials", default=5, low=0, high=100_000),
        n_warmup_steps=t.int("n_warmup_steps", default=2, low=0, high=100_000),
        percentile=t.float("percentile", default=25.0, low=0.0, high=100.0),
        min_resource=t.int("min_resource", default=1, low=1, high=100_000),
        reduction_factor=t.int("reduction_factor", default=3, low=2, high=100),
    )
    t.finish()
    return spec


def _parse_space(t: "_Table", family: str) -> dict[str, Param]:
    space: dict[str, Param] = {}
    for name in list(t.raw):
        field_name = f"{t.prefix}{name}"
        if family not in ("analytic", CUSTOM) and name not in DEFAULT_PARAMS:
            raise SpecError(t.source, field_name, f"unknown parameter; the {family} family understands "
                                                  f"{', '.join(DEFAULT_PARAMS)}{_did_you_mean(name, list(DEFAULT_PARAMS))}")
        space[name] = _parse_param(t.source, field_name, name, t.raw[name], family)
    t.raw = {}
    if family == "analytic" and not any(isinstance(p, (IntRange, FloatRange)) for p in space.values()):
        raise SpecError(t.source, "space", "the analytic family needs numeric ranges, e.g. x = { low = -4.5, high = 4.5 }")
    return space


def _parse_param(source: str, field_name: str, name: str, raw: Any, family: str) -> Param:
    if not isinstance(raw, dict):
        raw = {"value": raw}
    keys = set(raw)
    if keys <= {"value"} and keys:
        param: Param = Fixed(raw["value"])
    elif "choices" in keys:
        extra = keys - {"choices"}
        if extra:
            raise SpecError(source, field_name, f"a list of choices takes no {', '.join(sorted(extra))}; remove it")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpecError(source, field_name, f"choices must be a non-empty list, got {choices!r}")
        if len({repr(c) for c in choices}) != len(choices):
            raise SpecError(source, field_name, f"choices {choices} repeat a value; list each once")
        param = Choice(tuple(choices))
    elif {"low", "high"} <= keys:
        extra = keys - {"low", "high", "log", "step"}
        if extra:
            raise SpecError(source, field_name, f"unknown key {', '.join(sorted(extra))}; a range takes low, high, log, step")
        low, high, log, step = raw["low"], raw["high"], raw.get("log", False), raw.get("step")
        for key, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SpecError(source, field_name, f"{key} must be a number, got {v!r}")
            if not math.isfinite(v) or abs(v) > MAX_BOUND:
                raise SpecError(source, field_name, f"{key} = {v!r} is not a finite number within "
                                                    f"±{MAX_BOUND:g}; choose a smaller {key}")
        if not isinstance(log, bool):
            raise SpecError(source, field_name, f"log must be true or false, got {log!r}")
        if low > high:
            raise SpecError(source, field_name, f"low={low} is above high={high}; swap them")
        if log and low <= 0:
            raise SpecError(source, field_name, f"log=true needs low > 0, got low={low}; raise low or set log = false")
        if log and step not in (None, 1):
            raise SpecError(source, field_name, "log=true cannot take a step; remove step or log")
        is_int = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
        if name in BOUNDS and BOUNDS[name][2] and not is_int:
            raise SpecError(source, field_name, f"{name} is a whole number; write low and high without a decimal point")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0
                                 or not math.isfinite(step)):
            raise SpecError(source, field_name, f"step must be a positive number, got {step!r}")
        if step is not None and not _step_fits(low, high, step):
            raise SpecError(source, field_name, f"step {step} does not divide high - low = {high - low:g} (Optuna "
                                                f"would quietly shrink the range); choose high = low + a whole "
                                                f"number of steps, e.g. high = {_fitting_high(low, high, step):g}")
        param = IntRange(low, high, log, step or 1) if is_int else FloatRange(float(low), float(high), log,
                                                                              None if step is None else float(step))
    else:
        raise SpecError(source, field_name, f"expected a range {{ low = .., high = .. }}, a list {{ choices = [..] }} "
                                            f"or a fixed value, got {raw!r}")
    values = [param.value] if isinstance(param, Fixed) else list(param.choices) if isinstance(param, Choice) else []
    for v in values:
        if isinstance(v, float) and (not math.isfinite(v) or abs(v) > MAX_BOUND):
            raise SpecError(source, field_name, f"{v!r} is not a finite number within ±{MAX_BOUND:g}; choose another")
    if family != "analytic":
        _check_param_values(source, field_name, name, param)
    return param


def _step_fits(low: float, high: float, step: float) -> bool:
    steps = (high - low) / step
    return abs(steps - round(steps)) <= 1e-9 * max(1.0, abs(steps))


def _fitting_high(low: float, high: float, step: float) -> float:
    return low + math.floor((high - low) / step + 1e-9) * step


def _check_param_values(source: str, field_name: str, name: str, param: Param) -> None:
    values: list[Any]
    if isinstance(param, Fixed):
        values = [param.value]
    elif isinstance(param, Choice):
        values = list(param.choices)
    else:
        values = [param.low, param.high]
    if name in CHOICES:
        for v in values:
            if v not in CHOICES[name] or isinstance(v, bool) != isinstance(CHOICES[name][0], bool):
                raise SpecError(source, field_name, f"{v!r} is not one of {', '.join(map(repr, CHOICES[name]))}"
                                                    f"{_did_you_mean(str(v), [str(c) for c in CHOICES[name]])}")
        return
    if name in BOUNDS:
        lo, hi, must_int = BOUNDS[name]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (must_int and not isinstance(v, int)):
                kind = "a whole number" if must_int else "a number"
                raise SpecError(source, field_name, f"expected {kind}, got {v!r}")
            if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
                raise SpecError(source, field_name, f"{v!r} is outside {lo}..{hi}; choose values in that range")


def _check_consistency(source: str, data: DataSpec, model: ModelSpec, metric: str, space: dict[str, Param]) -> None:
    if metric == "val_accuracy" and model.output != "classification":
        raise SpecError(source, "metric", 'val_accuracy needs a classification output; set [model] output = "classification" '
                                          'or metric = "val_loss"')
    if model.output == "classification" and data.name in SERIES_DATASETS:
        raise SpecError(source, "model.output", f'dataset "{data.name}" is a regression target; set output = "regression"')
    if model.output == "regression" and data.name == "digits":
        raise SpecError(source, "model.output", 'dataset "digits" is a classification task; set output = "classification"')
    if "window" in space and data.name not in SERIES_DATASETS:
        raise SpecError(source, "space.window", f'window is the input length of series data; dataset "{data.name}" has none, remove it')
    for name in ("maxlen", "vocab_size"):
        if name in space and data.name != "csv_text":
            raise SpecError(source, f"space.{name}", f'{name} shapes the tokens of a csv_text dataset; dataset "{data.name}" '
                                                     "has none, remove it")
    if model.family == CUSTOM:
        return
    if model.family == "mlp" and "recurrent_dropout" in space:
        raise SpecError(source, "space.recurrent_dropout", 'the mlp family has no recurrent layers; remove recurrent_dropout')


class _Table:
    """One TOML table being read: typed getters that name the field on error, and a
    `finish` that rejects keys nobody asked for."""

    def __init__(self, raw: Any, source: str, prefix: str) -> None:
        if not isinstance(raw, dict):
            raise SpecError(source, prefix.rstrip("."), f"expected a table, got {raw!r}")
        self.raw = dict(raw)
        self.source = source
        self.prefix = prefix
        self._seen: list[str] = []

    def get(self, key: str, default: Any) -> Any:
        self._seen.append(key)
        return self.raw.pop(key, default)

    def table(self, key: str) -> "_Table":
        return _Table(self.get(key, {}), self.source, f"{self.prefix}{key}.")

    def _fail(self, key: str, message: str) -> SpecError:
        return SpecError(self.source, f"{self.prefix}{key}", message)

    def str(self, key: str, default: Any = None, required: bool = False) -> Any:
        if required and key not in self.raw:
            raise self._fail(key, f"is missing; add {key} = \"...\"")
        v = self.get(key, default)
        if v is not None and not isinstance(v, str):
            raise self._fail(key, f"expected a string, got {v!r}; put it in quotes")
        return v

    def int(self, key: str, default: int, low: int, high: int) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(key, f"expected a whole number, got {v!r}")
        if not low <= v <= high:
            raise self._fail(key, f"{v} is outside {low}..{high}; choose a value in that range")
        return v

    def float(self, key: str, default: float, low: float, high: float) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._fail(key, f"expected a number, got {v!r}")
        if not low <= v <= high:
            raise self._fail(key, f"{v} is outside {low}..{high}; choose a value in that range")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self._fail(key, f"expected true or false, got {v!r}")
        return v

    def choice(self, key: str, value: Any, allowed: tuple) -> bool:
        if value not in allowed:
            raise self._fail(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}"
                                  f"{_did_you_mean(str(value), [str(a) for a in allowed])}")
        return True

    def finish(self) -> None:
        for key in self.raw:
            known = self._seen
            raise self._fail(key, f"unknown key{_did_you_mean(key, known)}; "
                                  f"known keys here: {', '.join(known) or 'none'}")


def _display_path(path: Path) -> str:
    # The file as read from here: relative below the working directory, else absolute
    # (a shipped study run from another folder is not at studies/NAME.toml there).
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())
