"""Benchmarks: figures of seeds trained together, of a study's time, of workers and storage, and of
hpo against its peers (`hpo bench`, `hpo bench-study`, `hpo bench-workers`, `hpo bench-peers`).
"""
