"""The Optuna side: a spec and a storage in; trials asked, fitted, pruned, told and recorded, in one
worker or many, then confirmed on fresh seeds, replayed or exported.
"""
