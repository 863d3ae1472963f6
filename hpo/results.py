"""Results from Python, under the names the README documents: a study database in; the
`hpo_` views as DataFrames, read-only SQL and the report out. They live in
`hpo.reports.results` (SQL, DataFrames) and `hpo.reports.report` (the report).
"""

from hpo.reports.report import Comparison, Report, build_report, compare_scores, format_report, report_dict
from hpo.reports.results import (ReadOnlyRefused, confirmations_frame, curves_frame, params_frame, run_sql,
                                 seed_scores_frame, study_names, trials_frame)

__all__ = ["Comparison", "ReadOnlyRefused", "Report", "build_report", "compare_scores", "confirmations_frame",
           "curves_frame", "format_report", "params_frame", "report_dict", "run_sql", "seed_scores_frame",
           "study_names", "trials_frame"]
