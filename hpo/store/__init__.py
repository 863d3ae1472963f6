"""Storage: a URL in; Optuna's RDB storage for many workers (faults retried, the admission lock, claims,
counts) and the `hpo_` SQL views out.
"""
