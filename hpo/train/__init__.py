"""Training: a spec, a trial's params and seeds in; each seed's fit (scores, curves) out. Data, models, the
Keras backend, the vmapped engine and its initial weights, and the one lock-step loop (`fit`).
"""
