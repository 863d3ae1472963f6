"""Reports: a study database in; read-only SQL and DataFrames, statistics over seeds, learning-curve
diagnosis, the report, plots and optuna-dashboard out.
"""
