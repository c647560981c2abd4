"""A real PostgreSQL for the tests: Debian's PostgreSQL binaries (``initdb`` + ``pg_ctl``) on a fresh data
folder in /tmp, on 127.0.0.1 and a free port, trust auth, stopped (and the folder removed) at the end.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (``runuser``), on a
folder that user owns. Missing binaries are an error that says how to install them
(``bash scripts/install.sh`` does, with ``apt-get install -y postgresql``), never a skip.

Usage: ``with PostgresServer() as pg: pg.url`` (or ``start()`` / ``stop()``); ``pg.fresh_url()`` gives a URL
naming a new, empty schema (``?schema=t_...``) for one test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PG_USER = "postgres"


def pg_bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl`` (``pg_config --bindir``, else Debian's PostgreSQL 15-17)."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    candidates += [Path(f"/usr/lib/postgresql/{v}/bin") for v in (15, 16, 17)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    raise RuntimeError("PostgreSQL's server binaries (initdb, pg_ctl) are missing: run `bash scripts/install.sh` "
                       "(it runs `apt-get install -y postgresql`) or install Debian's postgresql package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One throw-away PostgreSQL cluster (see the module docstring)."""

    def __init__(self, port: int | None = None, fsync: bool = False) -> None:
        self.fsync = fsync  # off for tests (throw-away data); benchmarks turn it on, as in production
        self.bindir = pg_bindir()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kem-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.as_root = os.geteuid() == 0
        self.url = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"
        self._initialised = False

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL {what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
                               f"{proc.stdout.strip()[-1000:]}\nserver log:\n{log}")

    def start(self) -> PostgresServer:
        if self.as_root:
            self.dir.chmod(0o755)
            shutil.chown(self.dir, PG_USER, PG_USER)
        if not self._initialised:
            self._check(self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", PG_USER, "-E", "UTF8",
                                  "--no-sync", timeout=120), "initdb")
            self._initialised = True
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'} "
                f"-c max_connections=100 -c shared_buffers=64MB")
        self._check(self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60",
                              "start", timeout=90), "start")
        self._wait()
        return self

    def _wait(self, timeout: float = 30) -> None:
        import psycopg

        end = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise RuntimeError(f"PostgreSQL did not accept connections on port {self.port} within "
                                       f"{timeout:.0f} s; server log:\n{self.log.read_text(errors='replace')[-2000:]}"
                                       ) from None
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60)

    def restart(self) -> None:
        self.stop()
        self.start()

    def fresh_url(self, prefix: str = "t") -> str:
        """This server's URL naming a new, unused schema (created by the store on first connect)."""
        return f"{self.url}?schema={prefix}_{uuid.uuid4().hex[:12]}"

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
