"""hpo: honest hyperparameter optimisation for Keras models, stored in SQL."""

import os

# TensorFlow's C++ start-up chatter drowns the progress lines; set it before any import of
# TensorFlow (users can still raise it by exporting the variable themselves).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
