"""Static checks of docker-compose.yml (the Dockerfile has tests/test_dockerfile.py).

Docker cannot run where the tests run, so these parse the files and assert the facts the design relies
on (services, health gating, commands, GPU reservation, shared data volume, secrets, baked weights).
Compose variable interpolation (``${VAR:-default}``, ``${VAR:?message}``, ``$$``) is reproduced here so
that URLs can be checked the way compose would hand them to the containers.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile.gpu"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PYPROJECT = REPO_ROOT / "pyproject.toml"

SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
APP_SERVICES = ("migrate", "api", "worker")
LONG_RUNNING = ("api", "worker")
EXPECTED_COMMANDS = {
    "migrate": ["tuneserve", "migrate"],
    "api": ["tuneserve", "api", "--host", "0.0.0.0", "--port", "8000"],
    "worker": ["tuneserve", "worker", "--queues", "ingest,train"],
}
PASSWORD_REF = "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
WEIGHTS = (
    "ResNet18_Weights.IMAGENET1K_V1",
    "ResNet34_Weights.IMAGENET1K_V1",
    "ResNet50_Weights.IMAGENET1K_V2",
    "ResNet101_Weights.IMAGENET1K_V2",
)


# --------------------------------------------------------------------------- compose helpers


class MissingVariable(Exception):
    """A ``${VAR:?message}`` / ``${VAR?message}`` reference whose variable is not set."""


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate_str(value: str, env: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        is_set = name in env
        non_empty = bool(env.get(name))
        present = non_empty if op and op.startswith(":") else is_set
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":?", "?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if present else ""
        return env.get(name, "")

    return _VAR.sub(replace, value)


def interpolate(node, env: dict[str, str]):
    """Interpolate every string value (not keys), as compose does after loading the YAML."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, str):
        return interpolate_str(node, env)
    return node


def as_argv(command) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def mounts_of(service: dict) -> dict[str, str]:
    """Mount target -> source (named volume or host path)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    return mounts


def duration_seconds(value) -> float:
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unparseable duration {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def size_bytes(value) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(value).strip().lower())
    assert match, f"unparseable size {value!r}"
    return int(match[1]) * 1024 ** " kmg".index(match[2] or " ")


@pytest.fixture(scope="module")
def raw_compose() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(raw_compose: str) -> dict:
    return yaml.safe_load(raw_compose)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def resolved(compose: dict) -> dict:
    """The services as compose would run them with only the required secret set."""
    return interpolate(compose, {"POSTGRES_PASSWORD": "s3cret"})["services"]


# --------------------------------------------------------------------------- compose: structure


def test_compose_spec_has_no_version_key_and_all_services(compose: dict):
    assert "version" not in compose
    assert set(compose["services"]) >= SERVICES


def test_postgres_is_16_with_pg_isready_healthcheck_and_a_volume(services: dict, compose: dict):
    postgres = services["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["image"].split(":")[1].startswith("16")
    test = " ".join(as_argv(postgres["healthcheck"]["test"]))
    assert "pg_isready" in test
    source = mounts_of(postgres).get("/var/lib/postgresql/data")
    assert source in (compose.get("volumes") or {}), "postgres data should live in a named volume"


def test_redis_is_7_with_ping_healthcheck(services: dict):
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis"
    assert redis["image"].split(":")[1].startswith("7")
    test = as_argv(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_wait_for_healthy_backends_and_migration(services: dict, name: str):
    depends_on = services[name]["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs conditions, not a bare list"
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_migrate_is_one_shot_after_postgres_is_healthy(services: dict):
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"  # the string: a bare YAML `no` would load as False


@pytest.mark.parametrize("name", APP_SERVICES)
def test_commands_are_the_tuneserve_verbs(services: dict, name: str):
    assert as_argv(services[name]["command"]) == EXPECTED_COMMANDS[name]
    assert "entrypoint" not in services[name]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_build_the_gpu_image(services: dict, name: str):
    service = services[name]
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    assert (REPO_ROOT / build["context"]).resolve() == REPO_ROOT
    assert build.get("dockerfile") == DOCKERFILE.name
    assert DOCKERFILE.is_file()
    assert service["image"] == services["api"]["image"], "one image for migrate, api and worker"


def test_api_publishes_8000_and_health_checks_healthz_without_curl(resolved: dict):
    api = resolved["api"]
    container_ports = set()
    for port in api["ports"]:
        if isinstance(port, dict):
            assert port.get("published") is not None
            container_ports.add(int(port["target"]))
        else:
            parts = str(port).split(":")
            assert len(parts) >= 2, f"port {port!r} is not published on the host"
            container_ports.add(int(parts[-1].split("/")[0]))
    assert 8000 in container_ports
    test = as_argv(api["healthcheck"]["test"])
    assert test[0] in ("CMD", "CMD-SHELL")
    joined = " ".join(test)
    assert "urllib" in joined and "127.0.0.1:8000/healthz" in joined.replace("localhost", "127.0.0.1")
    assert "curl" not in joined and "wget" not in joined


def test_worker_reserves_an_nvidia_gpu(services: dict):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and device.get("count") == 1 and "gpu" in device.get("capabilities", [])
        for device in devices
    ), devices


def test_worker_has_shared_memory_and_time_to_checkpoint(services: dict):
    worker = services["worker"]
    assert size_bytes(worker["shm_size"]) >= 1024**3
    assert duration_seconds(worker["stop_grace_period"]) >= 60


def test_data_volume_is_shared_by_api_and_worker_at_data_dir(services: dict, compose: dict):
    data_dirs = {name: env_of(services[name])["TUNESERVE_DATA_DIR"] for name in APP_SERVICES}
    assert len(set(data_dirs.values())) == 1, data_dirs
    data_dir = data_dirs["api"]
    assert data_dir.startswith("/")
    sources = {name: mounts_of(services[name]).get(data_dir) for name in LONG_RUNNING}
    assert sources["api"] and sources["api"] == sources["worker"], sources
    assert sources["api"] in (compose.get("volumes") or {}), "DATA_DIR should be a named volume"


# --------------------------------------------------------------------------- compose: settings & secrets


def test_postgres_password_is_required_everywhere_it_is_used(raw_compose: str, services: dict):
    assert env_of(services["postgres"])["POSTGRES_PASSWORD"] == PASSWORD_REF
    references = re.findall(r"\$\{POSTGRES_PASSWORD[^}]*\}", raw_compose)
    assert references, "POSTGRES_PASSWORD is never referenced"
    assert set(references) == {PASSWORD_REF}
    assert PASSWORD_REF in env_of(services["api"])["TUNESERVE_DATABASE_URL"]


def test_interpolation_fails_without_password_and_needs_nothing_else(compose: dict):
    with pytest.raises(MissingVariable, match="set POSTGRES_PASSWORD"):
        interpolate(compose, {})
    interpolate(compose, {"POSTGRES_PASSWORD": "s3cret"})  # no other variable is required


def test_api_keys_are_optional(services: dict, resolved: dict):
    for name in LONG_RUNNING:
        assert env_of(services[name])["TUNESERVE_API_KEYS"] == "${TUNESERVE_API_KEYS:-}"
        assert env_of(resolved[name])["TUNESERVE_API_KEYS"] == ""
    with_keys = interpolate(services["api"]["environment"], {"POSTGRES_PASSWORD": "x", "TUNESERVE_API_KEYS": "k1,k2"})
    assert with_keys["TUNESERVE_API_KEYS"] == "k1,k2"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"POSTGRES_USER": "alice", "POSTGRES_DB": "tunedb"}],
    ids=["defaults", "custom-user-and-db"],
)
def test_database_url_is_psycopg_to_the_postgres_service(compose: dict, overrides: dict):
    env = {"POSTGRES_PASSWORD": "s3cret", **overrides}
    services = interpolate(compose, env)["services"]
    postgres_env = env_of(services["postgres"])
    for name in APP_SERVICES:
        url = urlsplit(env_of(services[name])["TUNESERVE_DATABASE_URL"])
        assert url.scheme == "postgresql+psycopg"
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.username == postgres_env["POSTGRES_USER"]
        assert url.password == postgres_env["POSTGRES_PASSWORD"] == "s3cret"
        assert url.path.lstrip("/") == postgres_env["POSTGRES_DB"]
        if overrides:
            assert (url.username, url.path) == ("alice", "/tunedb")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_broker_url_points_at_the_redis_service(resolved: dict, name: str):
    url = urlsplit(env_of(resolved[name])["TUNESERVE_BROKER_URL"])
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert url.port in (None, 6379)


# --------------------------------------------------------------------------- the CLI accepts the verbs


def _compose_verbs() -> list[tuple[str, list[str]]]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    verbs = {}
    for name in APP_SERVICES:
        argv = as_argv(services[name]["command"])
        if argv and argv[0] == "tuneserve":
            verbs.setdefault(argv[1], [arg for arg in argv[2:] if arg.startswith("--")])
    return sorted(verbs.items())


@pytest.mark.parametrize(("verb", "flags"), _compose_verbs(), ids=[verb for verb, _ in _compose_verbs()])
def test_cli_accepts_compose_verb(verb: str, flags: list[str], tmp_path: Path):
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", verb, "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout, f"`tuneserve {verb}` does not document {flag}"
