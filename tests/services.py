"""PostgreSQL and Redis for the scale-out tests: real servers from Debian, started here.

Each runs on a free loopback port with its data in a temporary folder and is
stopped by the fixture that started it; no system service is used. PostgreSQL
refuses to run as root, so as root its processes run as the ``postgres`` user
(created by Debian's package) and its folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from peers import LOCALHOST, PeerError, free_port, wait_until
from peers import _terminate as terminate

_POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (initdb, pg_ctl, postgres), newest version."""
    found = sorted(glob.glob(_POSTGRES_BIN_GLOB), key=lambda p: int(Path(p).parent.name))
    for folder in reversed(found):
        if (Path(folder) / "initdb").exists():
            return Path(folder)
    return None


def require_services() -> None:
    """Skip (or fail in CI) when redis-server or PostgreSQL is missing."""
    from peers import ALLOW_MISSING_PEERS_ENV

    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if postgres_bin() is None:
        missing.append("postgresql")
    if missing:
        message = f"missing: {', '.join(missing)} (make test installs them)"
        if os.environ.get(ALLOW_MISSING_PEERS_ENV):
            pytest.skip(message)
        pytest.fail(message)


def _as_postgres_user() -> Sequence[str]:
    return ("runuser", "-u", "postgres", "--") if os.geteuid() == 0 else ()


class PostgresServer:
    """A throw-away PostgreSQL cluster; :meth:`new_database` gives each test its own database."""

    def __init__(self, folder: Path) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise PeerError("PostgreSQL is not installed")
        self.bin = binaries
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.user = "dicom_node"

    def __enter__(self) -> Self:
        return self.start()

    def start(self) -> Self:
        """Create the cluster on first use, then start the server and wait until it accepts."""
        prefix = _as_postgres_user()
        if not self.data.exists():
            self._initdb(prefix)
        options = (
            f"-p {self.port} -c listen_addresses={LOCALHOST} -c unix_socket_directories="
            f"{self.folder} -c fsync=on -c max_connections=200"
        )
        subprocess.run(
            [*prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
             str(self.folder / "server.log"), "-o", options, "-w", "-t", "60", "start"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        return self

    def _initdb(self, prefix: Sequence[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if prefix:
            shutil.chown(self.folder, "postgres", "postgres")
            self.folder.chmod(0o700)
            # the parents must be traversable by the postgres user
            for parent in self.folder.parents:
                if parent == Path("/") or parent.stat().st_mode & 0o001:
                    continue
                parent.chmod(parent.stat().st_mode | 0o001)
        subprocess.run(
            [*prefix, str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
             "--auth=trust", "--encoding=UTF8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop at once (open connections are cut, as when the server goes away)."""
        subprocess.run(
            [*_as_postgres_user(), str(self.bin / "pg_ctl"), "-D", str(self.data),
             "-m", "immediate", "-w", "stop"],
            check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{LOCALHOST}:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        import sqlalchemy as sa

        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


class RedisServer:
    """redis-server on a free port, without persistence (the journal is what is durable)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", LOCALHOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, timeout=20, what="redis-server to answer")
        return self

    def _answers(self) -> bool:
        import redis

        if self.process is not None and self.process.poll() is not None:
            raise PeerError(f"redis-server exited with {self.process.returncode}")
        try:
            return bool(redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            terminate(self.process)


class S3Server:
    """An S3-compatible endpoint (moto's server) on a free port, with one empty bucket."""

    ACCESS_KEY = "testing-access-key"
    SECRET_KEY = "testing-secret-key"
    REGION = "us-east-1"

    def __init__(self, folder: Path, bucket: str = "dicom-node") -> None:
        self.folder = folder
        self.bucket = bucket
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def settings(self) -> dict[str, str]:
        """The node's ``storage.object_store`` section for this endpoint."""
        return {
            "bucket": self.bucket,
            "endpoint_url": self.endpoint_url,
            "region": self.REGION,
            "access_key_id": self.ACCESS_KEY,
            "secret_access_key": self.SECRET_KEY,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.REGION,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
        )

    def keys(self) -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=self.bucket)
            for item in page.get("Contents", [])
        ]

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "moto.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self._answers, timeout=30, interval=0.2, what="the S3 endpoint to answer")
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _answers(self) -> bool:
        import urllib.error
        import urllib.request

        if self.process is not None and self.process.poll() is not None:
            raise PeerError(f"moto server exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answers
        except OSError:
            return False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            terminate(self.process)


class WorkerProcess:
    """``dicom-node worker`` as a child process (``argv_prefix``: e.g. ``taskset -c 1``)."""

    def __init__(
        self,
        config_path: Path,
        name: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        argv_prefix: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        self.name = name
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self.argv_prefix = list(argv_prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process without waiting for it."""
        argv = [*self.argv_prefix, sys.executable, "-m", "dicom_node", "worker"]
        argv += ["--config", str(self.config_path), "--name", self.name, *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        """Start it and wait for its "ready" line (its pipelines are loaded by then)."""
        self.launch()
        wait_until(self.ready, timeout, interval=0.2, what=f"worker {self.name}")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise PeerError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return " ready: " in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the job in hand is left to its lease running out."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (Celery's warm shutdown), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return 0
        terminate(self.proc, timeout)
        return int(self.proc.returncode)
