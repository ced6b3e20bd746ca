"""Checks the deployment files (Dockerfile, docker-compose.yml, .dockerignore, deploy/) against the code.

Nothing here builds an image or starts a container: the files are parsed and compared with the settings, the
CLI and the HTTP routes they refer to, so that a renamed setting, command, option or port fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from api.routers.health import router as health_router
from cli.main import app as cli_app
from shared.settings import Environment, ModelEntry, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
PREFIX = "TUNEFORGE_"
TUNEFORGE_SERVICES = ("migrate", "api", "worker", "validator")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
FROM_AS = re.compile(r"^(?P<image>\S+)\s+AS\s+(?P<name>\S+)$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- helpers


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def interpolate(value: object) -> str:
    """Resolves compose `${...}` references: the default where there is one, else a non-default dummy."""

    def substitute(match: re.Match[str]) -> str:
        if match["op"] in (":-", "-"):
            return match["arg"]
        return f"dummy-{match['name'].lower().replace('_', '-')}"

    return INTERPOLATION.sub(substitute, str(value))


def compose_env(service: str) -> dict[str, str]:
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(value) for key, value in env.items()}


@cache
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Returns {stage name: [(INSTRUCTION, arguments), ...]}, continuation lines joined, comments dropped."""
    logical: list[str] = []
    buffer = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1].strip() + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, "the Dockerfile ends in a continuation line"
    stages: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            match = FROM_AS.match(rest)
            assert match, f"every stage is named (FROM image AS name): {line!r}"
            current = match["name"].lower()
            stages[current] = [("FROM", match["image"])]
        elif current is not None:
            stages[current].append((instruction, rest))
    return stages


def stage(name: str) -> list[tuple[str, str]]:
    return dockerfile_stages()[name]


def stage_chain(name: str) -> list[str]:
    """Returns the stage and the stages it is built FROM, base first."""
    chain = [name]
    while (parent := stage(chain[-1])[0][1].lower()) in dockerfile_stages():
        chain.append(parent)
    return chain[::-1]


def stage_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for each in stage_chain(name):
        for instruction, rest in stage(each):
            if instruction == "ENV":
                env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def stage_cmd(name: str) -> list[str]:
    cmds = [json.loads(rest) for each in stage_chain(name) for instr, rest in stage(each) if instr == "CMD"]
    assert cmds, f"stage {name} has no CMD"
    return cmds[-1]


def pip_installs(name: str) -> list[str]:
    """The `pip install` commands of a stage (its own RUN lines), one string each."""
    installs = []
    for instruction, rest in stage(name):
        if instruction == "RUN":
            installs += [part.strip() for part in rest.split("&&") if "pip install" in part]
    return installs


def extras(install: str) -> set[str]:
    return {extra.strip() for group in re.findall(r"\.\[([^\]]*)\]", install) for extra in group.split(",")}


def built_target(service: str) -> str:
    """The Dockerfile target a tuneforge service runs: its own build target, or that of the service that
    builds its image."""
    spec = services()[service]
    if "build" in spec:
        return spec["build"]["target"]
    builders = [s for s in services().values() if "build" in s and s.get("image") == spec["image"]]
    assert builders, f"{service} runs image {spec['image']!r} that no service builds"
    return builders[0]["build"]["target"]


def effective_command(service: str) -> list[str]:
    spec = services()[service]
    if "command" in spec:
        command = spec["command"]
        return command if isinstance(command, list) else shlex.split(command)
    return stage_cmd(built_target(service))


def option(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------------------------- compose


def test_compose_has_the_production_services() -> None:
    expected = {
        "postgres",
        "redis",
        "minio",
        "minio-init",
        "migrate",
        "api",
        "worker",
        "validator",
        "flower",
        "ray-head",
        "ray-worker",
    }
    assert set(services()) == expected
    assert "x-tuneforge-env" in compose()


def test_tuneforge_services_share_the_anchor_environment() -> None:
    anchor = compose()["x-tuneforge-env"]
    for name in TUNEFORGE_SERVICES:
        environment = services()[name]["environment"]
        # A service may add its own variables (the worker names its GPUs), never change the shared ones.
        assert {k: v for k, v in environment.items() if k in anchor} == anchor, name
    assert anchor["TUNEFORGE_ENVIRONMENT"] == "production"
    # One worker per node drives every GPU it is given: it names none, it uses all it sees.
    assert "TUNEFORGE_WORKER_GPUS" not in services()["worker"]["environment"]


def test_every_tuneforge_variable_is_a_settings_field() -> None:
    names: set[str] = set()
    for name in services():
        names |= {key for key in compose_env(name) if key.startswith(PREFIX)}
    names |= {m["name"] for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m["name"].startswith(PREFIX)}
    for stage_name in dockerfile_stages():
        names |= {key for key in stage_env(stage_name) if key.startswith(PREFIX)}
    assert len(names) >= 10
    unknown = sorted(n for n in names if n.removeprefix(PREFIX).lower() not in Settings.model_fields)
    assert not unknown, f"not fields of shared.settings.Settings: {unknown}"


def test_secrets_are_required_variables() -> None:
    text = COMPOSE.read_text()
    required = {m["name"] for m in INTERPOLATION.finditer(text) if m["op"] in (":?", "?")}
    needed = {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "TUNEFORGE_SECRET_KEY",
        "TUNEFORGE_S3_ACCESS_KEY_ID",
        "TUNEFORGE_S3_SECRET_ACCESS_KEY",
        "FLOWER_BASIC_AUTH",
    }
    assert needed <= required
    # No secret has a fallback value anywhere in the file.
    defaulted = {m["name"] for m in INTERPOLATION.finditer(text) if m["op"] in (":-", "-")}
    assert not needed & defaulted


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TUNEFORGE_* variable of the machine running the tests leaks into the settings built here."""
    for key in [k for k in os.environ if k.startswith(PREFIX)]:
        monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("service", TUNEFORGE_SERVICES)
def test_settings_build_in_production_from_the_compose_environment(
    service: str, clean_env: pytest.MonkeyPatch
) -> None:
    monkeypatch = clean_env
    env = {**stage_env(built_target(service)), **compose_env(service)}
    env = {key: value for key, value in env.items() if key.startswith(PREFIX)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    settings = Settings()

    assert settings.environment == Environment.production
    assert settings.database_url.startswith("postgresql://")
    assert settings.database_url.endswith("@postgres:5432/tuneforge")
    assert settings.broker_url.startswith("redis://redis:6379/")
    assert settings.storage_backend == "s3"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.allowed_s3_buckets == [settings.storage_bucket]
    assert str(settings.model_registry_file) == "/etc/tuneforge/models.yaml"

    # The production checks did run: without the secret key the same environment is refused.
    monkeypatch.delenv("TUNEFORGE_SECRET_KEY")
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings()


def test_compose_services_point_at_each_other_consistently() -> None:
    anchor = compose()["x-tuneforge-env"]
    postgres_env = compose_env("postgres")
    database_url = interpolate(anchor["TUNEFORGE_DATABASE_URL"])
    assert database_url == (
        f"postgresql://{postgres_env['POSTGRES_USER']}:{postgres_env['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres_env['POSTGRES_DB']}"
    )
    flower = services()["flower"]["command"]
    assert f"--broker={anchor['TUNEFORGE_BROKER_URL']}" in flower
    init_env = compose_env("minio-init")
    for key in ("TUNEFORGE_STORAGE_BUCKET", "TUNEFORGE_S3_ACCESS_KEY_ID", "TUNEFORGE_S3_SECRET_ACCESS_KEY"):
        assert init_env[key] == interpolate(anchor[key]), key
    assert init_env["MINIO_ROOT_USER"] == compose_env("minio")["MINIO_ROOT_USER"]


def test_depends_on_names_existing_services_with_valid_conditions() -> None:
    for name, spec in services().items():
        depends = spec.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, how in depends.items():
            assert dep in services(), f"{name} depends on unknown service {dep}"
            assert dep != name
            condition = how.get("condition", "service_started")
            target = services()[dep]
            if condition == "service_healthy":
                has_check = "healthcheck" in target or (
                    "build" in target and any(i == "HEALTHCHECK" for i, _ in stage(target["build"]["target"]))
                )
                assert has_check, f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{dep} is a one-shot; it must not restart"
            else:
                assert condition == "service_started", condition


def test_start_order() -> None:
    def deps(name: str) -> dict[str, str]:
        return {dep: how["condition"] for dep, how in services()[name]["depends_on"].items()}

    assert deps("migrate") == {"postgres": "service_healthy"}
    assert deps("minio-init") == {"minio": "service_healthy"}
    for name in ("api", "worker"):
        assert deps(name)["migrate"] == "service_completed_successfully"
        assert deps(name)["redis"] == "service_healthy"
        assert deps(name)["minio-init"] == "service_completed_successfully"


def test_infrastructure_services() -> None:
    postgres, redis, minio = services()["postgres"], services()["redis"], services()["minio"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "ping" in redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "healthcheck" in minio
    assert "minio/mc" in interpolate(services()["minio-init"]["image"])
    assert "mher/flower" in interpolate(services()["flower"]["image"])
    assert any(str(p).endswith(":5555") for p in services()["flower"]["ports"])
    declared = set(compose()["volumes"])
    for spec in services().values():
        for volume in spec.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":", 1)[0] in declared, volume


def test_minio_init_script_is_mounted_and_valid() -> None:
    spec = services()["minio-init"]
    mounts = dict(v.split(":")[:2] for v in spec["volumes"])
    script = mounts["./deploy/minio-init.sh"]
    assert script in spec["entrypoint"]
    assert (DEPLOY / "minio-init.sh").is_file()
    text = (DEPLOY / "minio-init.sh").read_text()
    assert "mc mb --ignore-existing" in text
    if shutil.which("sh"):
        subprocess.run(["sh", "-n", str(DEPLOY / "minio-init.sh")], check=True)


def test_worker_reserves_an_nvidia_gpu() -> None:
    worker = services()["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpus, "the worker reserves no NVIDIA GPU"
    count = gpus[0].get("count", "all")
    max_gpus = int(compose()["x-tuneforge-env"]["TUNEFORGE_MAX_GPUS_PER_JOB"])
    assert count == "all" or int(count) >= max_gpus, "the worker reserves fewer GPUs than a job may ask for"
    assert "shm_size" in worker
    assert re.fullmatch(r"\d+[gm]b?", str(worker["shm_size"]).lower())


@pytest.mark.usefixtures("clean_env")
def test_model_registry_mount_and_example() -> None:
    target = compose()["x-tuneforge-env"]["TUNEFORGE_MODEL_REGISTRY_FILE"]
    for name in ("api", "worker"):
        mounts = [v for v in services()[name]["volumes"] if isinstance(v, dict) and v.get("target") == target]
        assert mounts, f"{name} does not mount the model registry at {target}"
        assert mounts[0]["source"] == "./deploy/models.yaml"
        assert mounts[0]["read_only"] is True

    example = DEPLOY / "models.example.yaml"
    raw = yaml.safe_load(example.read_text())
    assert raw
    entries = {name: ModelEntry.model_validate(value) for name, value in raw.items()}
    bucket = interpolate(compose()["x-tuneforge-env"]["TUNEFORGE_STORAGE_BUCKET"])
    for name, entry in entries.items():
        # The default allowed_s3_buckets is the storage bucket only.
        assert entry.location.startswith(f"s3://{bucket}/"), name
    registry = Settings(model_registry_file=example, home=ROOT / ".tuneforge").model_registry()
    assert set(registry) == set(entries)


# ----------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_stages() -> None:
    stages = dockerfile_stages()
    assert {"base", "api", "worker"} <= set(stages)
    assert stage("base")[0][1].endswith("python:3.11-slim") or "PYTHON_IMAGE" in stage("base")[0][1]
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    assert stage_chain("api") == ["base", "api"]
    assert stage_chain("worker") == ["base", "worker"]
    assert services()["api"]["build"]["target"] == "api"
    assert services()["worker"]["build"]["target"] == "worker"
    assert built_target("migrate") == "api"


def test_images_run_as_a_non_root_user_without_bytecode() -> None:
    for name in ("api", "worker"):
        users = [rest for instruction, rest in stage(name) if instruction == "USER"]
        assert users and users[-1] not in ("root", "0"), name
        assert stage_env(name).get("PYTHONDONTWRITEBYTECODE") == "1", name


def test_api_image_has_no_worker_extra_and_worker_image_has_it() -> None:
    api_installs, worker_installs = pip_installs("api"), pip_installs("worker")
    assert any(re.search(r'"?\."?(\s|$)', i) for i in api_installs), api_installs
    assert all("worker" not in extras(i) for i in api_installs), api_installs
    assert all("torch" not in i for i in api_installs), api_installs
    # `--no-deps` installs no extra: the worker extra must come with its dependencies.
    with_deps = [i for i in worker_installs if "--no-deps" not in i]
    assert any("worker" in extras(i) for i in with_deps), worker_installs
    # The api image is torch-free only while the base dependencies are.
    assert not [d for d in pyproject()["project"]["dependencies"] if d.lower().startswith("torch")]


def test_worker_torch_is_the_cuda_build_of_the_pinned_version() -> None:
    pins = [d for d in pyproject()["project"]["optional-dependencies"]["worker"] if d.startswith("torch==")]
    assert len(pins) == 1
    version = pins[0].removeprefix("torch==")
    torch_installs = [i for i in pip_installs("worker") if "torch==" in i]
    assert torch_installs, "the worker target does not install torch explicitly"
    install = torch_installs[0]
    assert f"torch=={version}+" in install, f"the Dockerfile's torch differs from pyproject's {pins[0]}"
    assert "download.pytorch.org/whl/" in install


def test_tuneforge_commands_are_real_cli_commands() -> None:
    commands = [effective_command(name) for name in TUNEFORGE_SERVICES]
    commands += [stage_cmd(name) for name in ("api", "worker")]
    tuneforge = [c for c in commands if c and c[0] == "tuneforge"]
    assert len(tuneforge) == len(commands), commands
    assert {c[1] for c in tuneforge} == {"migrate", "api", "worker"}
    for argv in tuneforge:
        # Click parses every option before it acts on --help: a renamed command or option fails here.
        result = CliRunner().invoke(cli_app, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{shlex.join(argv)}: {result.output}"
    assert stage_cmd("api")[:2] == ["tuneforge", "api"]
    assert stage_cmd("worker")[:2] == ["tuneforge", "worker"]
    assert option(stage_cmd("worker"), "--role") == "train"


def test_ports_match_the_api_command() -> None:
    argv = effective_command("api")
    port = option(argv, "--port")
    assert option(argv, "--host") == "0.0.0.0"
    published = [str(p) for p in services()["api"]["ports"]]
    assert published and all(p.rsplit(":", 1)[-1] == port for p in published), published
    exposed = [rest for instruction, rest in stage("api") if instruction == "EXPOSE"]
    assert port in " ".join(exposed).split()
    healthchecks = [rest for instruction, rest in stage("api") if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert f"127.0.0.1:{port}/healthz" in healthchecks[0]
    assert "/healthz" in {route.path for route in health_router.routes}


def test_dockerignore_keeps_what_the_image_needs() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env"} <= patterns
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "alembic.ini", "migrations", *(p.rstrip("*") for p in packages)}
    assert not needed & patterns, f".dockerignore drops what the image needs: {needed & patterns}"
    for name in needed:
        assert (ROOT / name).exists(), name
