# The hpo worker image: `hpo worker`, `hpo create` and optuna-dashboard, from this repository.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# README.m[d]: copied when present (pyproject names it); the glob keeps the build going without it.
COPY pyproject.toml README.m[d] ./
COPY hpo ./hpo
COPY studies ./studies
# Editable, so the package keeps finding studies/ beside it (compose mounts ./studies there).
RUN pip install -e . && useradd --create-home --uid 1000 hpo
USER hpo

CMD ["hpo", "--help"]
