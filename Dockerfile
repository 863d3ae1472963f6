# The hpo worker image: `hpo worker`, `hpo create` and optuna-dashboard, from this repository.
# BASE: any image with Python 3.11 and pip on PATH; docker/make-base.sh builds one from
# Debian packages where no registry is reachable. EXTRAS: e.g. gpu, for JAX on NVIDIA GPUs.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, from pyproject.toml alone (the package is a stub until the code is
# copied), so a change to the code rebuilds in seconds instead of reinstalling TensorFlow.
# Editable: the package keeps finding studies/ beside it (compose mounts ./studies there).
COPY pyproject.toml ./
RUN mkdir hpo && touch hpo/__init__.py && pip install -e ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --create-home --uid 1000 hpo
COPY README.md ./
COPY hpo ./hpo
COPY studies ./studies
USER hpo

CMD ["hpo", "--help"]
