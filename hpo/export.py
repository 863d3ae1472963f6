"""The trained models from Python, under the names the README documents: a stored trial in,
each seed's Keras model and their ensemble out. They live in `hpo.study.export`.
"""

from hpo.study.export import SeedModel, TrialModels, export, rebuild_models, validation_split

__all__ = ["SeedModel", "TrialModels", "export", "rebuild_models", "validation_split"]
