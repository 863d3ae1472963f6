"""The study file: a TOML file under `studies/` (or a dict, or `hpo.tune`'s arguments) in, a validated
frozen `StudySpec` out; then the search space (`space`), the user's hooks (`hooks`) and KerasTuner's
`hp` (`tuner_hp`).

Each table has its own module, its fields and their checks side by side: `data`, `model`, `training`
(with [objective]), `search` ([sampler], [pruner]), `seeds` (with [confirm]) and `params` ([space]);
`study` puts them together. The names below are the ones the rest of hpo uses.
"""

from hpo.specs.data import LOADER, SERIES_DATASETS, DataSpec, resolve_data_path
from hpo.specs.model import CUSTOM, FAMILIES, RECURRENT_FAMILIES, ModelSpec
from hpo.specs.params import DATA_PARAMS, DEFAULT_PARAMS, Choice, Fixed, FloatRange, IntRange, Param, param_to_raw
from hpo.specs.search import PrunerSpec, SamplerSpec
from hpo.specs.seeds import MAX_SEEDS, ConfirmSpec
from hpo.specs.study import (MAX_TRIALS, STUDIES_DIR, StudySpec, find_spec_file, list_specs, load_spec, parse_spec,
                             spec_to_dict)
from hpo.specs.training import BACKENDS, MAX_EPOCHS, ObjectiveSpec, TrainingSpec

__all__ = ["BACKENDS", "CUSTOM", "DATA_PARAMS", "DEFAULT_PARAMS", "FAMILIES", "LOADER", "MAX_EPOCHS", "MAX_SEEDS",
           "MAX_TRIALS", "RECURRENT_FAMILIES", "SERIES_DATASETS", "STUDIES_DIR", "Choice", "ConfirmSpec", "DataSpec",
           "Fixed", "FloatRange", "IntRange", "ModelSpec", "ObjectiveSpec", "Param", "PrunerSpec", "SamplerSpec",
           "StudySpec", "TrainingSpec", "find_spec_file", "list_specs", "load_spec", "param_to_raw", "parse_spec",
           "resolve_data_path", "spec_to_dict"]
