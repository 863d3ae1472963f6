"""The storage proxy: one database in, a gRPC port that many workers share out
(`hpo storage-proxy`), and the workers' side of it (`ProxyStorage`, a `grpc://host:port` URL).

The port serves Optuna's own gRPC storage service (`optuna.storages.GrpcStorageProxy`
speaks it) and, beside it, what hpo's workers need that Optuna's storage API does not
have: the study's admission lock, trial counts, heartbeats and the trials whose worker
died, user attributes written on finished trials, one study attribute. The proxy holds
a few database connections, however many workers it serves; they hold none.

The admission lock is the database's: the proxy takes it for the worker that asked and
holds it (one connection) while that worker admits its trial, so workers behind this
proxy, behind another and straight on the database share it. A lock lost meanwhile (its
connection dropped, its lease run out) is reported when the worker lets go, and the
worker gives its new trial back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import optuna

from hpo.errors import StorageError
from hpo.store.faults import LockLost, classify_storage_error, retry, retry_storage_call
from hpo.store.urls import address, proxy_address

SERVICE = "hpo.StorageProxy"
# A worker holds the admission lock for a few round trips, and renews it every third of
# this while it does (a slow database); one that died holding it (the proxy cannot see a
# client go) loses it after this long.
LOCK_LEASE_SECONDS = 30.0
# Optuna's storage calls and ours, each a short database round trip (a call waits in
# the proxy, not in the worker, while the database is away).
DEFAULT_THREADS = 32
DEFAULT_CONNECTIONS = 4
_METHODS = ("hello", "try_lock", "renew", "unlock", "record_heartbeat", "stale_trial_ids", "heartless_trial_ids",
            "counts", "trial_user_attrs", "write_trial_user_attrs", "study_system_attr")
# Calls that wait in the proxy while the database is away; a heartbeat does not (the next
# one will do, as on a direct connection), nor the lock (the worker asks again after a
# pause), and hello touches no database.
_WAITING = ("stale_trial_ids", "heartless_trial_ids", "counts", "trial_user_attrs", "write_trial_user_attrs",
            "study_system_attr")
# No limit on a message: a trial's record (every seed's curves) is sent whole.
_MESSAGE_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# A proxy that stops answering without closing its connections (its machine gone, the
# network cut, the process stopped) would leave a worker's call waiting forever: workers
# ping it every 20 s and drop a connection whose ping goes 10 s unanswered, so the call
# fails, and is retried (or given up, in one line) as for a proxy that is down.
KEEPALIVE_MS = (20_000, 10_000)


def _client_options() -> list[tuple[str, int]]:
    every, within = KEEPALIVE_MS
    # gRPC 1.8x waits `ping_timeout_ms` (a minute by default) for a ping's answer, whatever
    # `keepalive_timeout_ms` says: both are set.
    return [*_MESSAGE_OPTIONS, ("grpc.keepalive_time_ms", every), ("grpc.keepalive_timeout_ms", within),
            ("grpc.http2.ping_timeout_ms", within), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


# The proxy takes those pings, idle or not, however often (gRPC's server default would
# close the connection of a client pinging more often than every 5 minutes).
_SERVER_OPTIONS = [*_MESSAGE_OPTIONS, ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000), ("grpc.http2.max_ping_strikes", 0)]


class _Service:
    """What the proxy answers beside Optuna's storage service: each method takes and
    returns JSON-able values, against the proxy's own `ResilientRDBStorage`."""

    def __init__(self, storage: optuna.storages.RDBStorage, clock: Callable[[], float] = time.monotonic,
                 cached: optuna.storages.BaseStorage | None = None) -> None:
        self.storage = storage
        self.clock = clock
        self.cached = cached
        # Per study: its holder, when the holder's lease runs out, and what lets go of
        # the database's lock taken for it.
        self._holders: dict[int, tuple[str, float, Callable[[], None]]] = {}
        # Studies whose database lock is being taken (outside the guard) right now.
        self._taking: set[int] = set()
        self._guard = threading.Lock()

    def hello(self) -> dict[str, Any]:
        return {"heartbeat_interval": self.storage.heartbeat_interval, "grace_period": self.storage.grace_period,
                "optuna": optuna.__version__}

    def try_lock(self, study_id: int, holder: str) -> bool:
        """Take the study's admission lock for `holder` (or renew its lease), unless another
        holds it and its lease has not run out. The proxy takes the database's own lock
        for the holder (`try_study_lock`), so workers straight on the database and workers
        of another proxy in front of it wait for this one too. A worker asks again after a
        pause, as on PostgreSQL: no call waits in the proxy's threads for a lock, and none
        waits for the database while holding the proxy's guard."""
        from hpo.store.storage import try_study_lock

        if self.renew(study_id, holder):  # it holds it already (its answer was lost on the way)
            return True
        with self._guard:
            held = self._holders.get(study_id)
            if (held is not None and held[1] > self.clock()) or study_id in self._taking:
                return False
            dead = self._holders.pop(study_id, None)  # its holder never came back
            self._taking.add(study_id)
        try:
            if dead is not None:
                _let_go(dead[2])
            release = try_study_lock(self.storage, study_id)
        finally:
            with self._guard:
                self._taking.discard(study_id)
        if release is None:  # a worker on the database, or another proxy, holds it
            return False
        with self._guard:
            self._holders[study_id] = (holder, self.clock() + LOCK_LEASE_SECONDS, release)
        return True

    def renew(self, study_id: int, holder: str) -> bool:
        """Renew `holder`'s lease; False where it holds the lock no more (never taken
        again for it: a lock lost meanwhile must be seen lost at `unlock`)."""
        with self._guard:
            held = self._holders.get(study_id)
            if held is None or held[0] != holder:
                return False
            self._holders[study_id] = (holder, self.clock() + LOCK_LEASE_SECONDS, held[2])
            return True

    def unlock(self, study_id: int, holder: str) -> bool:
        """Let go of `holder`'s lock. False where it was lost meanwhile: its lease ran out
        (the holder could not reach the proxy to renew it, or the proxy restarted), or the
        database dropped the connection that held it; the holder's admission may then
        have overlapped another's, and the worker gives its trial back."""
        with self._guard:
            held = self._holders.get(study_id)
            if held is None or held[0] != holder:
                return False
            del self._holders[study_id]
        try:
            held[2]()
        except Exception as e:  # noqa: BLE001 - a database fault: the lock went with the connection
            if classify_storage_error(e) is None:
                raise
            return False
        return True

    def expire(self, everyone: bool = False) -> None:
        """Let go of the locks whose holders' leases ran out (a worker that died holding
        one: nobody through this proxy may be asking for it, but a worker on the database
        may be), or of every lock (the proxy stops)."""
        with self._guard:
            now = self.clock()
            gone = [study_id for study_id, (_, until, _) in self._holders.items() if everyone or until <= now]
            releases = [self._holders.pop(study_id)[2] for study_id in gone]
        for release in releases:
            _let_go(release)

    def record_heartbeat(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)

    def stale_trial_ids(self, study_id: int) -> list[int]:
        return self.storage._get_stale_trial_ids(study_id)

    def heartless_trial_ids(self, study_id: int) -> list[int]:
        from hpo.store.storage import heartless_trial_ids

        return heartless_trial_ids(self.storage, study_id)

    def counts(self, study_id: int) -> dict[str, Any]:
        from hpo.store.storage import count_trials

        return dataclasses.asdict(count_trials(self.storage, study_id))

    def trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.storage.get_trial_user_attrs(trial_id)

    def write_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any], running_only: bool = False) -> None:
        from hpo.store.storage import write_trial_user_attrs

        write_trial_user_attrs(self.storage, trial_id, attrs, running_only=running_only)
        if not running_only and self.cached is not None:
            _refresh_cached_trial(self.cached, self.storage, trial_id)

    def study_system_attr(self, study_id: int, key: str) -> Any:
        from hpo.store.storage import study_system_attr

        return study_system_attr(self.storage, study_id, key)


def _let_go(release: Callable[[], None]) -> None:
    """Let go of a lock nobody holds any more; a connection that dropped already has."""
    with contextlib.suppress(Exception):
        release()


def _refresh_cached_trial(cached: optuna.storages.BaseStorage, storage: optuna.storages.RDBStorage,
                          trial_id: int) -> None:
    """Replace a finished trial in the trial cache of the proxy's Optuna service with the
    database's (attributes written after it finished, such as a confirmation, are not
    in the cache). Optuna's cache keeps no public way to do this; where its layout has
    changed, nothing is done and clients see the trial as it finished."""
    try:
        with cached._lock:
            study_id, number = cached._trial_id_to_study_id_and_number[trial_id]
            cached._studies[study_id].trials[number] = storage.get_trial(trial_id)
    except (AttributeError, KeyError):
        pass


class _Waiting:
    """The proxy's storage as Optuna's service sees it: every call waits out a database
    fault that goes away by itself (a restart), as a worker's own calls do, instead of
    failing the worker's call."""

    def __init__(self, storage: optuna.storages.BaseStorage, rdb: optuna.storages.RDBStorage) -> None:
        self._storage, self._rdb = storage, rdb

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: retry_storage_call(self._rdb, lambda: attr(*args, **kwargs))

    def set_trial_param(self, trial_id: int, *args: Any) -> None:
        # Optuna's cache sets params only on trials it has read or created: a worker's trial
        # created before this proxy (re)started, and sampled from what the last one said, is
        # unknown to it (a bare KeyError). The database itself takes it, checking the
        # distribution as the cache would; a trial the database lacks is still a KeyError.
        try:
            retry_storage_call(self._rdb, lambda: self._storage.set_trial_param(trial_id, *args))
        except KeyError:
            retry_storage_call(self._rdb, lambda: self._rdb.set_trial_param(trial_id, *args))


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def _handler(service: _Service) -> Any:
    import grpc

    def method(name: str) -> Any:
        call = getattr(service, name)
        waits = name in _WAITING

        def answer(request: dict, context: Any) -> Any:
            try:
                # Wrapped: gRPC sends no message at all for a handler's None.
                if waits:
                    return {"value": retry_storage_call(service.storage, lambda: call(**request))}
                return {"value": call(**request)}
            except KeyError as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            except optuna.exceptions.UpdateFinishedTrialError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:  # noqa: BLE001 - the worker hears it as one line, the proxy goes on
                fault = classify_storage_error(e)
                if fault is not None and fault[0] == "transient":
                    # The worker waits and asks again (a heartbeat: the next one will do).
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"the database is away: {fault[1]}")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"[:2000])

        return grpc.unary_unary_rpc_method_handler(answer, request_deserializer=json.loads,
                                                   response_serializer=_encode)

    return grpc.method_handlers_generic_handler(SERVICE, {name: method(name) for name in _METHODS})


def serve_proxy(storage: optuna.storages.RDBStorage, host: str, port: int, *, threads: int = DEFAULT_THREADS,
                ready: Callable[[int], None] = lambda port: None, stop: threading.Event | None = None) -> None:
    """Serve `storage` on host:port until SIGTERM or SIGINT (or `stop` is set);
    `ready(port)` is called once the port listens (port 0 picks a free one).

    Raises:
        StorageError: The port cannot be taken, or this Optuna has no gRPC proxy.
    """
    # gRPC's core logs a port it cannot take on stderr, beside our one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        import grpc
        from optuna.storages._grpc.auto_generated.api_pb2_grpc import add_StorageServiceServicer_to_server
        from optuna.storages._grpc.servicer import OptunaStorageProxyService
    except ImportError as e:
        raise StorageError(f"this Optuna ({optuna.__version__}) has no gRPC storage proxy, or grpcio is missing "
                           f"({e}); pip install 'optuna>=5' grpcio protobuf") from e
    # Not gRPC's default SO_REUSEPORT: a second proxy on a port in use must fail, not
    # share the port (and the workers) with the first, each with its own admission lock.
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0), *_SERVER_OPTIONS])
    # Optuna's service reads through its trial cache, as `optuna.storages.get_storage` wraps it.
    cached = optuna.storages.get_storage(storage)
    add_StorageServiceServicer_to_server(OptunaStorageProxyService(_Waiting(cached, storage)), server)
    service = _Service(storage, cached=cached)
    server.add_generic_rpc_handlers((_handler(service),))
    try:
        bound = server.add_insecure_port(address(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise StorageError(f"hpo storage-proxy cannot listen on {address(host, port)}: the port is taken or the address "
                           "is not this machine's; pass another --port or --host")
    stop = stop or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    server.start()
    try:
        ready(bound)
        while not stop.wait(LOCK_LEASE_SECONDS / 3):
            with contextlib.suppress(Exception):  # nothing it meets may stop the proxy
                service.expire()
    finally:
        # Calls in flight finish (a worker's tell is not cut in half); new ones are refused.
        server.stop(grace=5).wait()
        service.expire(everyone=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


class ProxyStorage(optuna.storages.GrpcStorageProxy, optuna.storages._heartbeat.BaseHeartbeat):
    """Optuna's gRPC storage client for a `grpc://host:port` URL (`hpo storage-proxy`),
    with hpo's calls and heartbeats (their interval and grace period are the proxy's),
    each call retried like `ResilientRDBStorage`'s while the proxy is away."""

    def __init__(self, url: str, *, retry_seconds: float, connect_seconds: float) -> None:
        host, port = proxy_address(url)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # our lines say what went wrong, not its core's
        self.url = url
        self.retry_seconds = retry_seconds
        self.check_stop: Callable[[], None] = lambda: None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(host=host, port=port)
            from hpo.store.storage import MAX_RETRY, RetryLostTrial

            callback = RetryLostTrial(max_retry=MAX_RETRY)
        try:
            self.wait_server_ready(timeout=connect_seconds)
        except ConnectionError as e:
            raise StorageError(f"cannot reach the storage proxy at {url} for {connect_seconds:.0f} s: check the "
                               f"address, or start one there with hpo storage-proxy --storage DATABASE_URL "
                               f"--port {port}") from e
        hello = self.call("hello")
        self.heartbeat_interval: int | None = hello["heartbeat_interval"]
        self.grace_period: int | None = hello["grace_period"]
        self.heartbeat_stale_trial_callback = callback if self.heartbeat_interval else None

    def _setup(self) -> None:
        import grpc
        from optuna.storages._grpc.auto_generated.api_pb2_grpc import StorageServiceStub
        from optuna.storages._grpc.client import GrpcClientCache

        # Optuna's own channel, with no limit on what it sends either (a trial's record),
        # and pings that notice a proxy gone silent.
        self._channel = grpc.insecure_channel(address(self._host, self._port), options=_client_options())
        self._stub = StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)
        self._calls = {name: self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=_encode,
                                                       response_deserializer=json.loads) for name in _METHODS}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_calls", None)
        state.pop("check_stop", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.check_stop = lambda: None
        super().__setstate__(state)

    def call(self, name: str, **request: Any) -> Any:
        """One of the proxy's own calls (`_Service`), retried while the proxy is away."""
        return retry(lambda: self.call_once(name, **request), self.url, self.retry_seconds,
                     check_stop=self.check_stop)

    def call_once(self, name: str, **request: Any) -> Any:
        import grpc

        try:
            return self._calls[name](request)["value"]
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(e.details()) from e
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise optuna.exceptions.UpdateFinishedTrialError(e.details()) from e
            if e.code() == grpc.StatusCode.INTERNAL:
                raise StorageError(f"storage proxy {self.url}: {e.details()}") from e
            raise

    def try_study_lock(self, study_id: int) -> Callable[[], None] | None:
        """The proxy's admission lock for the study (see `_Service.try_lock`), or None while
        another holds it: the function that lets it go. Its lease is renewed meanwhile (the
        database may be slow, or away); letting go raises `LockLost` where the proxy lost it."""
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not self.call("try_lock", study_id=study_id, holder=holder):
            return None
        held = threading.Event()

        def renew() -> None:
            while not held.wait(LOCK_LEASE_SECONDS / 3):
                with contextlib.suppress(Exception):  # the proxy is away: unlock will say it was lost
                    self.call_once("renew", study_id=study_id, holder=holder)

        renewer = threading.Thread(target=renew, name=f"lock-{study_id}", daemon=True)
        renewer.start()

        def release() -> None:
            held.set()
            renewer.join()
            try:
                intact = retry(lambda: self.call_once("unlock", study_id=study_id, holder=holder), self.url,
                               min(self.retry_seconds, LOCK_LEASE_SECONDS), quiet=True)
            except Exception:  # noqa: BLE001 - a proxy away for this long lost the lock anyway
                intact = False
            if not intact:
                raise LockLost(f"storage proxy {self.url}: the study's admission lock was lost while this worker "
                               "held it (the proxy restarted or could not be reached, or the database dropped the "
                               "lock's connection)")
        return release

    # BaseHeartbeat: what Optuna's `fail_stale_trials` and hpo's workers use.
    def record_heartbeat(self, trial_id: int) -> None:
        self.call_once("record_heartbeat", trial_id=trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.call("stale_trial_ids", study_id=study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self.heartbeat_stale_trial_callback

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        # From the database: attributes written on a finished trial after this process
        # first read it (a confirmation) are not in the client's trial cache.
        return self.call("trial_user_attrs", trial_id=trial_id)


def _retried(name: str) -> Callable:
    base = getattr(optuna.storages.GrpcStorageProxy, name)

    def method(self: ProxyStorage, *args: Any, **kwargs: Any) -> Any:
        return retry(lambda: base(self, *args, **kwargs), self.url, self.retry_seconds, check_stop=self.check_stop)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base.__doc__
    return method


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials"):
    setattr(ProxyStorage, _name, _retried(_name))
