"""Dashboard: a study database URL in, optuna-dashboard serving it out, after every
finished trial of every hpo study got its markdown note (per-seed scores, diagnosis).

Notes are written where a trial is recorded (the objective, while the trial still runs,
through `write_trial_note`); `hpo dashboard` only fills in the trials that lack one: those recorded before notes
existed, or by a worker that could not import optuna-dashboard.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

import optuna
import sqlalchemy

from hpo.record import SPEC_ATTR
from hpo.reports.diagnosis import trial_note
from hpo.store.storage import get_storage
from hpo.store.urls import existing_sqlite_path, mask_url, refuse_proxy, resolve_storage_url
from hpo.store.views import create_views
from hpo.words import plural


def write_missing_notes(storage: str | None = None, echo: Callable[[str], None] = lambda _: None) -> int:
    """Give every finished trial with a per-seed record, in every study created by hpo,
    a note if it has none. Returns how many notes were written."""
    from optuna_dashboard._note import note_ver_key

    rdb = get_storage(storage)
    create_views(rdb.engine)
    written = 0
    # get_all_studies, not get_all_study_summaries: the summaries load every trial.
    for study in rdb.get_all_studies():
        if SPEC_ATTR not in study.user_attrs:
            continue
        study_id = study._study_id
        # The dashboard keeps notes as study system attributes, one version key per trial.
        noted = set(rdb.get_study_system_attrs(study_id))
        # Which trials have a per-seed record, from the view: loading every trial through
        # Optuna would decode every learning curve (17 s for 5,000 trials) to find none.
        with rdb.engine.connect() as conn:
            recorded = conn.execute(sqlalchemy.text(
                "SELECT trial_id FROM hpo_trials WHERE study_id = :study_id AND n_seeds IS NOT NULL "
                "AND state IN ('COMPLETE', 'PRUNED')"), {"study_id": study_id}).scalars().all()
        missing = [trial_id for trial_id in recorded if note_ver_key(trial_id) not in noted]
        if not missing:
            continue
        echo(f"writing notes for {plural(len(missing), 'trial')} of {study.study_name}")
        metric = study.user_attrs[SPEC_ATTR].get("metric", "score")
        for trial_id in missing:
            frozen = rdb.get_trial(trial_id)
            write_trial_note(rdb, study_id, trial_id, trial_note(frozen.number, frozen.user_attrs, metric))
        written += len(missing)
    return written


def serve_dashboard(storage: str | None = None, host: str = "127.0.0.1", port: int = 8080,
                    echo: Callable[[str], None] = print, allow_writes: bool = False, access_log: bool = False) -> None:
    """Fill in missing trial notes, then serve optuna-dashboard until interrupted.

    Read-only unless `allow_writes`: optuna-dashboard has no such mode and serves Delete
    and Create buttons to anyone who can open the page, so every request but a read is
    refused (HTTP 403) before it reaches it. The per-request log is off unless `access_log`.
    """
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from optuna_dashboard import wsgi

    url = resolve_storage_url(storage)
    refuse_proxy(url, "the dashboard's notes and views")
    existing_sqlite_path(url)
    write_missing_notes(url, echo)
    app = wsgi(get_storage(url, command="dashboard"))
    if not allow_writes:
        app = read_only(app)
    mode = "read and write" if allow_writes else "read-only; --allow-writes to enable changes"
    echo(f"optuna-dashboard for {mask_url(url)} at http://{host}:{port}/ ({mode}; Ctrl-C stops it)")

    class Handler(WSGIRequestHandler):
        def log_request(self, *args: object) -> None:
            if access_log:
                super().log_request(*args)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    make_server(host, port, app, server_class=Server, handler_class=Handler).serve_forever()


# Shown at the foot of every page of a read-only dashboard: its Create, Delete and note
# buttons are optuna-dashboard's own, and would otherwise only answer 403 when pressed.
READ_ONLY_BANNER = (b'<div id="hpo-read-only" style="position:fixed;bottom:0;left:0;right:0;z-index:10000;'
                    b'background:#fff3cd;color:#664d03;padding:6px 12px;font:14px sans-serif;text-align:center">'
                    b"Read-only: this dashboard refuses changes (creating or deleting studies, editing notes); "
                    b"start it with <code>hpo dashboard --allow-writes</code> to allow them.</div>")


def read_only(app: Callable) -> Callable:
    """A WSGI app that passes reads (GET, HEAD, OPTIONS) to `app` and refuses the rest, and
    says on each HTML page that it is read-only."""
    def guarded(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() not in ("GET", "HEAD", "OPTIONS"):
            start_response("403 Forbidden", [("Content-Type", "application/json")])
            return [b'{"reason": "this dashboard is read-only; start it with hpo dashboard --allow-writes"}']
        answer: dict = {}

        def capture(status: str, headers: list, exc_info: object = None) -> Callable:
            answer.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None

        body = app(environ, capture)
        headers = answer["headers"]
        if any(k.lower() == "content-type" and v.startswith("text/html") for k, v in headers):
            try:
                page = b"".join(body)
            finally:
                getattr(body, "close", lambda: None)()
            page = page.replace(b"</body>", READ_ONLY_BANNER + b"</body>", 1)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(page))))
            body = [page]
        start_response(answer["status"], headers, answer["exc_info"])
        return body

    return guarded


def write_trial_note(storage: optuna.storages.BaseStorage, study_id: int, trial_id: int, body: str,
                     replace: bool = False) -> bool:
    """Store `body` as the dashboard note of a trial that has none yet (with `replace`: in
    place of the one it has); False when optuna-dashboard is not installed.

    optuna-dashboard keeps a note as study system attributes: the body in chunks and a
    version. Its `save_note` reads every attribute of the study to find the version, a
    cost that grows with the study (5,000 notes took minutes); a first note is version 1,
    so it is written directly, body first so no reader sees a version without a body.
    Replacing one (rare: an incumbent that gained seeds) reads them once, as `save_note`
    would, to bump the version and blank the chunks a shorter body no longer fills.
    """
    note = _dashboard_note_module()
    if note is None:
        return False
    note_str_key_prefix, note_ver_key = note.note_str_key_prefix, note.note_ver_key
    chunks = note.split_body(body, trial_id)
    version = 1
    if replace:
        old = storage.get_study_system_attrs(study_id)
        version = int(old.get(note_ver_key(trial_id)) or 0) + 1
        # The dashboard joins chunks 0..n-1 for the n it finds, so a stale one must stay, empty.
        chunks.update({k: "" for k in old if k.startswith(note_str_key_prefix(trial_id)) and k not in chunks})
    for key, value in chunks.items():
        storage.set_study_system_attr(study_id, key, value)
    storage.set_study_system_attr(study_id, note_ver_key(trial_id), version)
    return True


def _dashboard_note_module():
    # optuna-dashboard's note helpers (`_note.py`: math, typing, optuna) without the package
    # around them: its __init__ loads the whole web app, pandas and scikit-learn with it,
    # 120 MB and 2 s in every worker (128 analytic workers did not fit in 24 GB).
    if "optuna_dashboard._note" in sys.modules:
        return sys.modules["optuna_dashboard._note"]
    if _NOTE_MODULE in sys.modules:
        return sys.modules[_NOTE_MODULE]
    package = importlib.util.find_spec("optuna_dashboard")
    if package is None or not package.submodule_search_locations:
        return None
    path = os.path.join(list(package.submodule_search_locations)[0], "_note.py")
    # Another optuna-dashboard without that file: no notes, as when the package is missing.
    spec = importlib.util.spec_from_file_location(_NOTE_MODULE, path) if os.path.isfile(path) else None
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_NOTE_MODULE] = module
    return module


_NOTE_MODULE = "hpo._dashboard_note"
