"""docker-compose.yml: its structure (no Docker engine needed), and the exact `command:`
lines of its services run against a real local PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name, "")
        if op == ":-":
            return current or arg
        if op == ":?" and not current:
            raise AssertionError(f"compose would stop: {arg}")
        return current

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def test_services_healthcheck_dependencies_and_ports(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "create", "worker", "dashboard"}
    pg = services["postgres"]
    assert pg["volumes"] == ["pgdata:/var/lib/postgresql/data"] and "pgdata" in compose["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"]) and pg["healthcheck"]["retries"] >= 3
    assert "ports" not in pg  # the database is reachable from the compose network only
    healthy = {"condition": "service_healthy"}
    created = {"condition": "service_completed_successfully"}
    assert services["create"]["depends_on"] == {"postgres": healthy}
    assert services["create"]["restart"] == "no"
    assert services["worker"]["depends_on"] == {"postgres": healthy, "create": created}
    assert services["dashboard"]["depends_on"] == {"postgres": healthy, "create": created}
    # Scalable: nothing that two copies of a worker would fight over.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert interpolate(services["dashboard"]["ports"], {}) == ["127.0.0.1:8080:8080"]
    assert [name for name, s in services.items() if "ports" in s] == ["dashboard"]


def test_credentials_come_from_the_environment(compose):
    text = COMPOSE.read_text()
    assert "${POSTGRES_PASSWORD:?" in text
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "STORAGE" in key:
                assert "${POSTGRES_PASSWORD" in value, (key, value)
        command = " ".join(service.get("command", []))
        assert "POSTGRES_PASSWORD" not in command and "postgresql" not in command  # never on a command line
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["POSTGRES_PASSWORD"] == ""
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
    assert "COPY hpo" in (ROOT / "Dockerfile").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compose_commands_run_against_real_postgresql(compose, postgres):
    """create, then two workers, then the dashboard: the very command lines of the file."""
    url = postgres.create_database()
    dotenv = {"POSTGRES_PASSWORD": "unused-here", "HPO_STUDY": "beale", "HPO_STUDY_NAME": "compose_beale",
              "HPO_TRIALS": "8"}
    services = compose["services"]
    env = {**os.environ, "HPO_STORAGE": url, "PYTHONUNBUFFERED": "1"}

    def command(name: str) -> list[str]:
        argv = interpolate(services[name]["command"], dotenv)
        # The image's `hpo` is this repository's package; run it from here.
        return [sys.executable, "-m", "hpo", *argv[1:]] if argv[0] == "hpo" else [sys.executable, *argv[1:]]

    subprocess.run(command("create"), env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    workers = [subprocess.Popen(command("worker"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, out + err
    trials = optuna.load_study(study_name="compose_beale", storage=url).get_trials(deepcopy=False)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 8 == len(trials)
    # Started alike, the scaled workers still seed their samplers apart.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8

    port = _free_port()
    dotenv.update(DASHBOARD_HOST="127.0.0.1", DASHBOARD_PORT=str(port))
    dashboard = subprocess.Popen(command("dashboard"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env=env)
    try:
        body = None
        deadline = time.monotonic() + 60
        while body is None and time.monotonic() < deadline and dashboard.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, dashboard.stderr.read() if dashboard.poll() is not None else "no answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["compose_beale"]
        assert "unused-here" not in " ".join(command("dashboard"))
        delete = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies/1", method="DELETE")
        try:
            urllib.request.urlopen(delete, timeout=10)
            raise AssertionError("the compose dashboard let a DELETE through")
        except urllib.error.HTTPError as e:
            assert e.code == 403
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
