"""A real PostgreSQL server for the tests: initdb in a temporary folder, postgres on a free port of 127.0.0.1, stopped
at the end of the test module. Imported by the test modules that use it (a conftest.py here would shadow
tests/conftest.py: the test folders are not packages); tests that use it are skipped, with the reason, only
where PostgreSQL's binaries are not installed (CI installs Debian's postgresql).

As root (CI, this project's machines) the server runs as the ``postgres`` user, which initdb requires; the process
is started directly under that user (subprocess's ``user=``, as ``runuser -u postgres`` would) so that its pid is
postgres's own and a signal stops it, not a wrapper.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from _serve_helpers import free_port

START_TIMEOUT_S = 60  # a generous bound on a loaded 2-core machine; the loop ends as soon as it answers
CROSSING_S = 30  # bound on a change crossing between connections or processes (a notification: milliseconds)


def eventually(check, what: str, wait_s: float = CROSSING_S):
    """Poll ``check`` until it returns a truthy value (bounded), for what crosses between connections: not instant."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"not within {wait_s} s: {what}")


def postgres_bindir() -> Path | None:
    """Debian's /usr/lib/postgresql/N/bin (the newest N), else the folder of a postgres on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


class PostgresServer:
    """One initdb'd cluster; start() and stop() may be called again (a restart keeps the data)."""

    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.root = bindir, root
        self.data = root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            shutil.chown(root, self.user, self.user)
        self._as_user([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                       "--no-sync", "-E", "UTF8", "--locale=C"], check=True)

    def _as_user(self, cmd: list[str], **kwargs):
        user = {"user": self.user, "group": self.user, "extra_groups": []} if os.geteuid() == 0 else {}
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, **user,
                              **kwargs)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        user = {"user": self.user, "group": self.user, "extra_groups": []} if os.geteuid() == 0 else {}
        log = open(self.root / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
             # no fsync: the tests kill and restart siamkit's server and stop postgres cleanly, never the machine;
             # a shutdown then takes 0.1 s instead of seconds of syncing every test's database
             "-c", "fsync=off"],
            stdout=log, stderr=log, cwd=self.root, **user)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.accepts_connections():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {(self.root / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def accepts_connections(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.dsn(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open connections are cut, as in a restart by an administrator."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=START_TIMEOUT_S)
        self.proc = None

    def new_database(self) -> str:
        """A fresh, empty database for one test: its dsn."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


@pytest.fixture(scope="module")
def postgres_server():
    """The module's PostgreSQL server (started once per test module that imports these fixtures; a test that stops
    it starts it again)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="skpg"))  # short: the socket path must stay under 107 characters
    try:
        server = PostgresServer(bindir, root)
        server.start()
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres_server) -> str:
    """A fresh database on the session's server, for one test."""
    if postgres_server.proc is None:  # a test that stopped it failed before starting it again
        postgres_server.start()
    return postgres_server.new_database()
