"""A private PostgreSQL server for tests and benchmarks (``initdb`` + ``pg_ctl`` in a temp dir).

Run as root, the server runs as the ``postgres`` user (``runuser``); otherwise as the caller.
Listens on 127.0.0.1 only, on a free port, with fsync off (throwaway data).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PrivatePostgres", "find_pg_bin"]

_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14", "13")]


def find_pg_bin() -> Path | None:
    """The directory with ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    for d in _BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrivatePostgres:
    root: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd

    @classmethod
    def start(cls) -> "PrivatePostgres":
        """Start a server; raises RuntimeError with the reason when that is not possible."""
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found; install the postgresql package")
        root = Path(tempfile.mkdtemp(prefix="openinfra-pg-"))
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server as") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
        self = cls(root, _free_port(), bin_dir)
        data = root / "data"
        try:
            subprocess.run(self._cmd([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                      "-E", "UTF8", "--no-sync"]), check=True, capture_output=True, timeout=120)
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {root} -c fsync=off -c max_connections=200"
            subprocess.run(self._cmd([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                      "-w", "-t", "60", "start"]), check=True, capture_output=True, timeout=90)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')[-500:]}") from None
        return self

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        import psycopg

        if not name.isidentifier():
            raise ValueError(f"name: expected an identifier, got {name!r}")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        subprocess.run(self._cmd([str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                                  "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
