"""A throw-away PostgreSQL server: ``initdb`` + ``pg_ctl`` on a free loopback port.

For the tests and ``catalog-enrich demo --catalog-kind=postgres``; production points the job at its
own server through ``CATALOG_ENRICH_PG_DSN``. PostgreSQL refuses to run as root, so under root the
server runs as the ``postgres`` system user (Debian's ``postgresql`` package creates it) from a
folder under the system's temporary directory that user can reach.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from catalog_enrichment.errors import CatalogEnrichError

__all__ = ["LocalPostgres"]

SERVER_USER = "postgres"

# argv: the owner's pid, the server's folder, the command that stops the server. Polls until the
# folder is gone (a normal stop) or the owner is (then stops the server and removes the folder).
_WATCHDOG = """
import os, shutil, subprocess, sys, time
owner, folder, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
while os.path.isdir(folder):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        subprocess.run(stop, capture_output=True, timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)
        break
    time.sleep(1)
"""


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for lib in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (lib / name).is_file():
                return str(lib / name)
        raise CatalogEnrichError(
            f"{name} not found: install PostgreSQL (apt-get install postgresql) to start a local server"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """A server of its own in a fresh folder; :meth:`dsn` connects to it (password auth).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, *, database: str = "catalog", user: str = "catalog") -> None:
        self.database, self.user = database, user
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.folder: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if os.geteuid() == 0:  # initdb and postgres refuse root
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise CatalogEnrichError(
                f"{Path(argv[0]).name} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}"
            )
        return done

    def start(self) -> LocalPostgres:
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise CatalogEnrichError(
                    f"PostgreSQL will not run as root, and there is no {SERVER_USER!r} user to run it as "
                    "(apt-get install postgresql creates one)"
                ) from None
        self.folder = Path(tempfile.mkdtemp(prefix="catalog-enrich-pg-"))
        data, pwfile = self.folder / "data", self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.folder, SERVER_USER)
            shutil.chown(pwfile, SERVER_USER)
        self._run(
            _binary("initdb"), "-D", str(data), "-U", self.user, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "-E", "UTF8", "--no-locale",
        )  # fmt: skip
        pwfile.unlink()
        self.port = _free_port()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c max_connections=50"
        self._run(_binary("pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip
        import psycopg

        self._watchdog = self._watch()
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def _watch(self) -> subprocess.Popen[bytes]:
        """A watchdog that stops the server and removes its folder once this process is gone, so a
        run stopped part-way (Ctrl-C, a CI timeout, SIGKILL) leaves no server behind."""
        assert self.folder is not None
        stop = [_binary("pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop"]
        if os.geteuid() == 0:
            stop = ["runuser", "-u", SERVER_USER, "--", *stop]
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.folder), *stop],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped with the owner's process group: it outlives it
        )

    def dsn(self, database: str | None = None) -> str:
        """A libpq connection string for the server (holds the password: keep it out of logs)."""
        return (
            f"host=127.0.0.1 port={self.port} dbname={database or self.database} user={self.user} "
            f"password={self.password}"
        )

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self._run(_binary("pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait()
                self._watchdog = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
