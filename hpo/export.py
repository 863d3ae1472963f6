"""The trained models from Python, under the names the README documents: a stored trial in,
each seed's Keras model and their ensemble out. They live in `hpo.study.export`.
"""

from hpo.study.export import (SUFFIX, ExportPlan, SeedModel, TrialModels, check_output, custom_classes,
                              ensemble_model, export, output_files, plan_export, rebuild_models, save_models,
                              score_model, validation_split)

__all__ = ["SUFFIX", "ExportPlan", "SeedModel", "TrialModels", "check_output", "custom_classes", "ensemble_model",
           "export", "output_files", "plan_export", "rebuild_models", "save_models", "score_model", "validation_split"]
