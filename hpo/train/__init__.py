"""Training: a spec, a trial's params and seeds in; each seed's fit (scores, curves) out. Data, models,
the vmapped engine and its replicas' initial weights, and the one lock-step loop (`fit`); the Keras
backend they train on is set up below every stage (`hpo.backend`).
"""
