"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary folder, started with
``pg_ctl start -w`` on a unix socket in that folder and on a free loopback port, stopped with
``pg_ctl stop -m fast`` and removed at the end.

PostgreSQL refuses to run as root: as root, the folder is given to the ``postgres`` user (Debian's
package makes it) and every server command runs through ``runuser -u postgres --``. The
superuser ``postgres`` logs in over the socket without a password (``trust``, local only); the
tests connect as ``chuanhu``, a role with a password (``scram-sha-256`` over TCP), which owns one
fresh database per test (:meth:`Cluster.new_database`).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

ROLE = "chuanhu"


def find_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: ``CHUANHU_PG_BIN``, ``pg_config --bindir`` (when
    the server's programs are there: libpq's pg_config may come without them), the newest
    ``/usr/lib/postgresql/<version>/bin``, or where ``initdb`` is on PATH; None when none has them."""
    candidates: list[str] = []
    if os.environ.get("CHUANHU_PG_BIN"):
        candidates.append(os.environ["CHUANHU_PG_BIN"])
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(os.path.realpath(initdb)).parent))
    for folder in candidates:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """One PostgreSQL cluster of the test session (see the module's docstring)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.password = secrets.token_urlsafe(18)
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chuanhu-pg-"))  # short: a socket's path is at most 107 bytes
        self.data, self.sockets, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.sockets.mkdir()
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, and there is no 'postgres' user to run PostgreSQL as "
                                   "(apt-get install postgresql makes it)") from None
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._databases = 0

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def start(self) -> None:
        pwfile = self.root / "superuser-password"  # (initdb wants one for a host auth method)
        pwfile.write_text(secrets.token_urlsafe(18))
        if self._as:
            shutil.chown(pwfile, "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        options = (f"-k {self.sockets} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")
        self.superuser(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}'")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def superuser(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        """Run ``sql`` as the superuser, over the socket (autocommit: CREATE DATABASE may run)."""
        import psycopg

        with psycopg.connect(host=str(self.sockets), port=self.port, user="postgres", dbname=dbname,
                             autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        """A new, empty database owned by ``chuanhu``; its name."""
        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}"
        self.superuser(f"CREATE DATABASE {name} OWNER {ROLE} TEMPLATE template0 STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        self.superuser(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def url(self, dbname: str, password: str | None = None) -> str:
        """``postgresql://chuanhu:<password>@127.0.0.1:<port>/<dbname>`` (TCP, password checked)."""
        return f"postgresql://{ROLE}:{password or self.password}@127.0.0.1:{self.port}/{dbname}"

    def socket_url(self, dbname: str) -> str:
        """``postgresql:///<dbname>?host=<socket folder>&port=<port>&user=chuanhu`` (the socket, no password)."""
        return f"postgresql:///{dbname}?host={self.sockets}&port={self.port}&user={ROLE}"
