"""A whole study: a TOML file under `studies/` (or a dict, from Python or the study database) in, a validated
frozen `StudySpec` out, every table checked by its own module and then against each other.

`spec_to_dict`/`parse_spec` round-trip the spec through the study database for remote workers.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpo.errors import OptionError, SpecError, did_you_mean
from hpo.specs.data import LOADER, SERIES_DATASETS, DataSpec, parse_data
from hpo.specs.model import CUSTOM, ModelSpec, parse_model
from hpo.specs.params import FloatRange, Param, param_to_raw, parse_space
from hpo.specs.search import PrunerSpec, SamplerSpec, parse_pruner, parse_sampler
from hpo.specs.seeds import MAX_SEEDS, ConfirmSpec, parse_confirm, parse_seeds
from hpo.specs.table import Table, display_path, read_text_file, why_not_a_file
from hpo.specs.training import MAX_EPOCHS, METRICS, ObjectiveSpec, TrainingSpec, parse_objective, parse_training


STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"

MAX_TRIALS = 10**7


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
    hint = did_you_mean(name_or_path, known)
    raise SpecError(name_or_path, "", f"no such study file or study name; known studies: {', '.join(known)}{hint}")


def load_spec(name_or_path: str | Path) -> StudySpec:
    """Read and validate a study file (a path, or a name from `studies/`)."""
    path = find_spec_file(str(name_or_path))
    source = display_path(path)
    try:
        raw = tomllib.loads(read_text_file(path, source, "", "study file"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(source, "", f"is not valid TOML: {e}; fix the syntax") from e
    return parse_spec(raw, source=source, base_dir=path.resolve().parent)


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
    top = Table(raw, source, "")
    name = top.str("name", required=True)
    if not name.strip():
        raise SpecError(source, "name", 'is empty; name the study, e.g. name = "my_study"')
    description = top.str("description", default="")
    # Written by hpo beside a spec stored in the study database, not by users.
    stored_dir = top.str("base_dir", default=None, listed=False)
    if base_dir is None and stored_dir is not None:
        base_dir = Path(stored_dir)
    model = parse_model(top.table("model"), base_dir)
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
    seeds, seeds_max = parse_seeds(top)
    seed = top.int("seed", default=0, low=0, high=2**31 - 1)
    trials = top.int("trials", default=20, low=1, high=MAX_TRIALS)
    objective = parse_objective(top.table("objective"))
    data = DataSpec() if analytic else parse_data(top.table("data"), base_dir, check_files)
    if analytic:
        top.table("data").finish()
    training = parse_training(top.table("training"))
    sampler = parse_sampler(top.table("sampler"), seed)
    pruner_table = top.table("pruner")
    pruner = parse_pruner(pruner_table, default_kind="none" if objective.mode == "pareto" else "median")
    if objective.mode == "pareto" and pruner.kind != "none":
        raise SpecError(source, "pruner.kind", 'objective mode "pareto" has two objectives and Optuna cannot prune '
                                               'multi-objective trials; set [pruner] kind = "none"')
    if objective.mode == "pareto" and seeds_max is not None:
        raise SpecError(source, "seeds", 'objective mode "pareto" has no single incumbent for adaptive seeds to race '
                                         f'against; set a fixed count, e.g. seeds = {seeds_max}')
    space = parse_space(top.table("space"), model.family)
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
    confirm = parse_confirm(top.table("confirm"))
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


def _natural_output(data: DataSpec, metric: str) -> str:
    if data.name in ("digits", "csv_text") or metric == "val_accuracy":
        return "classification"
    if data.name == "csv_table":
        return data.task
    return "regression"


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
