"""A throwaway PostgreSQL server for the tests: initdb in a temp dir, pg_ctl on a free
loopback port, stopped and removed at the end. Tests may stop and restart it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid


def find_pg_bin() -> str | None:
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster owned by the test session."""

    def __init__(self, bin_dir: str) -> None:
        self.bin_dir = bin_dir
        self.dir = tempfile.mkdtemp(prefix="hpo-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        # initdb refuses to run as root: run the server as the postgres user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", self.data, "-U", "hpo", "--auth=trust", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [os.path.join(self.bin_dir, tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c max_connections=200 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def start_if_stopped(self) -> None:
        """Start the server unless it runs (for a test that stopped it and then failed)."""
        status = [os.path.join(self.bin_dir, "pg_ctl"), "-D", self.data, "status"]
        if self.user:
            status = ["runuser", "-u", self.user, "--", *status]
        if subprocess.run(status, capture_output=True, cwd=self.dir).returncode != 0:
            self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://hpo@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=hpo dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PgBouncer:
    """PgBouncer in transaction mode in front of a `PostgresServer`, with `pool` server
    connections for each database: every client transaction may run on another server
    connection, and clients past the pool wait for one."""

    def __init__(self, server: PostgresServer, pool: int = 2) -> None:
        self.server = server
        self.dir = tempfile.mkdtemp(prefix="hpo-pgbouncer-")
        self.port = _free_port()
        with open(os.path.join(self.dir, "users.txt"), "w") as f:
            f.write('"hpo" ""\n')
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as f:
            f.write(f"[databases]\n* = host=127.0.0.1 port={server.port}\n"
                    f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                    f"auth_type = trust\nauth_file = {self.dir}/users.txt\npool_mode = transaction\n"
                    f"default_pool_size = {pool}\nmax_client_conn = 500\n"
                    # A client starved of a server connection fails in seconds, not minutes.
                    f"query_wait_timeout = 30\nlogfile = {self.dir}/log\npidfile = {self.dir}/pid\n")
        if server.user:
            pw = pwd.getpwnam(server.user)
            for name in ("", "users.txt", "pgbouncer.ini"):
                os.chown(os.path.join(self.dir, name), pw.pw_uid, pw.pw_gid)
        cmd = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "-d", os.path.join(self.dir, "pgbouncer.ini")]
        if server.user:  # PgBouncer will not run as root
            cmd = ["runuser", "-u", server.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.dir)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

    def url(self, database_url: str) -> str:
        """The same database (a `PostgresServer` URL), reached through PgBouncer."""
        return database_url.replace(f":{self.server.port}/", f":{self.port}/")

    def close(self) -> None:
        try:
            with open(os.path.join(self.dir, "pid")) as f:
                os.kill(int(f.read()), 15)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(iter(glob.glob("/usr/sbin/pgbouncer")), None)
