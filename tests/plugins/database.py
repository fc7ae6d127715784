"""Pytest fixtures: a real PostgreSQL server (Debian package) for the journal database.

Each server is a fresh ``initdb`` cluster in a private temporary folder, listening on a
free 127.0.0.1 port (and a unix socket in that folder only), stopped by its PID. As
root the server runs as the unprivileged ``postgres`` user (or ``nobody``): PostgreSQL
refuses to run as root, so the folder is created outside pytest's root-only tmp_path
and handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_for


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (make system-deps installs it)")
    return Path(found[-1]).parent


def _unprivileged_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither 'postgres' nor 'nobody' exists")


class PostgresServer:
    """One throw-away cluster. ``start()``/``stop()`` may be called repeatedly (the data
    stays), so tests can take the database away and bring it back."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.user = _unprivileged_user()
        self.dir = Path(tempfile.mkdtemp(prefix="dts-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                   "-U", "dts", "-E", "UTF8", "--no-sync", "--no-instructions"])

    def _popen_args(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "cwd": str(self.dir)}

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                              **self._popen_args())
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr or proc.stdout}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://dts@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            **self._popen_args())
        log.close()
        wait_for(self.ready, timeout=30, interval=0.1, what=f"PostgreSQL on port {self.port}")

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"PostgreSQL exited: {self.log_tail()}")
        proc = subprocess.run([str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1",
                               "-p", str(self.port)], timeout=10)
        return proc.returncode == 0

    def log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID; open connections are cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def create_database(self, name: str) -> str:
        self._run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", "dts", name])
        return self.url(name)

    def query(self, database: str, sql: str) -> list[list[str]]:
        """Rows of ``sql`` through psql (independent of the code under test)."""
        proc = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p",
                               str(self.port), "-U", "dts", "-d", database, "-At", "-F", "\t",
                               "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"psql failed: {proc.stderr}")
        return [line.split("\t") for line in proc.stdout.splitlines() if line]

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL server of this test's own (user ``dts``, trust auth)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
