"""The trial record: the names of the user attributes hpo stores on every trial (and the
study's spec), written by the Optuna side and read by storage, the SQL views and reports.
"""

# Per trial; people and our SQL views rely on these names.
ATTR_MEAN = "mean"
ATTR_STD = "std"
ATTR_SEED_SCORES = "seed_scores"
ATTR_SEEDS = "seeds"
ATTR_BEST_EPOCHS = "best_epochs"
ATTR_EPOCHS_RUN = "epochs_run"
ATTR_FIT_SECONDS = "fit_seconds"
ATTR_COMPILE_SECONDS = "compile_seconds"
# Seconds a thread spent building and compiling the trial while the one before it trained
# (the worker's ask-ahead; absent where the trial built itself).
ATTR_PREPARED_SECONDS = "prepared_seconds"
ATTR_CURVES = "curves"
ATTR_PATH = "training_path"
ATTR_BACKEND = "backend"
ATTR_FAIL_REASON = "fail_reason"
ATTR_PRUNED_AT = "pruned_at_epoch"
ATTR_SEED_STOP = "seed_stop_reason"
# Set on a trial given back because its worker was stopped (it does not count).
ATTR_INTERRUPTED = "interrupted"
# Percentile-bootstrap 95% interval of the mean over every seed the trial was fitted on.
ATTR_CI_LOW = "ci_low"
ATTR_CI_HIGH = "ci_high"
# Seeds fitted for a trial after it finished, while it was the incumbent and a challenger
# came close; the selection record above (and Optuna's value) stays as it was.
ATTR_ADDED_SEEDS = "incumbent_seeds"
ATTR_ADDED_SCORES = "incumbent_scores"
ATTR_ADDED_BEST_EPOCHS = "incumbent_best_epochs"
ATTR_ADDED_EPOCHS_RUN = "incumbent_epochs_run"
ATTR_ADDED_CURVES = "incumbent_curves"
ATTR_ADDED_FAIL_REASON = "incumbent_fail_reason"
# Mean and std over the selection seeds and the added ones together.
ATTR_ALL_MEAN = "all_seeds_mean"
ATTR_ALL_STD = "all_seeds_std"
# On a challenger whose race ended at `seeds_max` undecided: the incumbent's number.
ATTR_UNDECIDED_AGAINST = "undecided_against"
# The `hpo confirm` refit on fresh seeds.
ATTR_CONFIRM_SEEDS = "confirm_seeds"
ATTR_CONFIRM_SCORES = "confirm_scores"
ATTR_CONFIRM_MEAN = "confirm_mean"
ATTR_CONFIRM_STD = "confirm_std"
# The worker (host:pid) that ran the trial.
ATTR_WORKER = "worker"

# Per study: the validated spec, from which any worker rebuilds the study.
SPEC_ATTR = "hpo_spec"
