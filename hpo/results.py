"""Results from Python, under the names the README documents: a study database in; the
`hpo_` views as DataFrames, read-only SQL and the report out. They live in
`hpo.reports.results` (SQL, DataFrames) and `hpo.reports.report` (the report).
"""

from hpo.reports.report import (ALPHA, MIN_TRIALS_FOR_ADVICE, Comparison, Report, build_report, compare_scores,
                                format_report, rank_trials, report_dict)
from hpo.reports.results import (FORMATS, ReadOnlyRefused, confirmations_frame, connect_readonly, curves_frame,
                                 format_frame, params_frame, run_sql, seed_scores_frame, stored_spec, study_direction,
                                 study_names, trial_attr, trials_frame)

__all__ = ["ALPHA", "FORMATS", "MIN_TRIALS_FOR_ADVICE", "Comparison", "ReadOnlyRefused", "Report", "build_report",
           "compare_scores", "confirmations_frame", "connect_readonly", "curves_frame", "format_frame", "format_report",
           "params_frame", "rank_trials", "report_dict", "run_sql", "seed_scores_frame", "stored_spec",
           "study_direction", "study_names", "trial_attr", "trials_frame"]
