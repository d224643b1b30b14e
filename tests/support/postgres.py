"""A real PostgreSQL 15 cluster for tests: initdb in a temporary folder, pg_ctl start and stop.

initdb refuses to run as root: as root the cluster runs as `nobody`, in a folder it owns. The
server listens on 127.0.0.1 (a free port, password auth) and on a Unix socket in its folder.
`stop()` and `start()` let a test take the database away and bring it back (an outage).

    cluster = PostgresCluster()
    url = cluster.new_database()        # postgresql://douane:...@127.0.0.1:PORT/db_1
    with cluster.outage(): ...         # stopped for the block, started again after it
    cluster.close()
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.support.gateway import free_port

BIN = Path(os.environ.get("DOUANE_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "douane"
PASSWORD = "pg-test-secret-1f2e3d"  # a test's own cluster; checked absent from logs and errors


def available() -> bool:
    return (BIN / "initdb").exists()


class PostgresCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="douane-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._names = itertools.count(1)
        # as root, everything below runs as nobody (initdb and postgres refuse root)
        self._as = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] \
            if os.geteuid() == 0 else []
        if self._as:
            os.chown(self.dir, 65534, 65534)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as:
            os.chown(pwfile, 65534, 65534)
        self._run(BIN / "initdb", "-D", self.data, "-U", USER, "--pwfile", pwfile,
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            # a throwaway cluster: durability off, small, quick to stop
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\n"
                       "shared_buffers = 32MB\nmax_connections = 200\n")
        self.start()

    def _run(self, *args: object) -> None:
        subprocess.run([*self._as, *map(str, args)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.dir)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this cluster (one per test module); its URL."""
        name = f"db_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def start(self) -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start")

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as in an outage."""
        self._run(BIN / "pg_ctl", "-D", self.data, "-w", "-t", "120", "-m", "fast", "stop")

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The database down for the block, back up after it (whatever the block raised)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running():
            self._run(BIN / "pg_ctl", "-D", self.data, "-w", "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
