"""Static checks of docker-compose.yml and docker-compose.cpu.yml (the Dockerfile and the container
entrypoint have tests/test_dockerfile.py).

Docker need not run where the tests run (bench/compose-smoke.sh runs the stack for real), so these parse
the files and assert the facts the design relies on (services, health gating, commands, GPU reservations,
the published port, shared data volume, secrets as files).
Compose variable interpolation (``${VAR:-default}``, ``${VAR:?message}``, ``$$``) is reproduced here so
that URLs can be checked the way compose would hand them to the containers.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.compose_files import as_argv, duration_seconds, env_of, interpolate, mounts_of, size_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
CPU_COMPOSE_FILE = REPO_ROOT / "docker-compose.cpu.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile.gpu"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PYPROJECT = REPO_ROOT / "pyproject.toml"

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "ingest"}
APP_SERVICES = ("migrate", "api", "worker", "ingest")
LONG_RUNNING = ("api", "worker", "ingest")
WORKERS = ("worker", "ingest")
GPU_SERVICES = ("api", "worker")
EXPECTED_COMMANDS = {
    "migrate": ["tuneserve", "migrate"],
    "api": ["tuneserve", "api", "--host", "0.0.0.0", "--port", "8000"],
    "worker": ["tuneserve", "worker", "--queues", "train,batch"],
    "ingest": ["tuneserve", "worker", "--queues", "ingest"],
}
SECRETS_DIR_REF = "${TUNESERVE_SECRETS_DIR:-./secrets}"
WEIGHTS = (
    "ResNet18_Weights.IMAGENET1K_V1",
    "ResNet34_Weights.IMAGENET1K_V1",
    "ResNet50_Weights.IMAGENET1K_V2",
    "ResNet101_Weights.IMAGENET1K_V2",
)


# --------------------------------------------------------------------------- compose helpers


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
    """The services as compose would run them with no variable set."""
    return interpolate(compose, {})["services"]


def gpu_devices(service: dict) -> list[dict]:
    return ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []


def secret_names(service: dict) -> set[str]:
    return {item if isinstance(item, str) else item["source"] for item in service.get("secrets") or []}


def secret_path(service: dict, name: str) -> str:
    """Where compose mounts secret ``name`` in the container."""
    for item in service.get("secrets") or []:
        if isinstance(item, dict) and item["source"] == name and item.get("target"):
            target = item["target"]
            return target if target.startswith("/") else f"/run/secrets/{target}"
    return f"/run/secrets/{name}"


# --------------------------------------------------------------------------- compose: structure


def test_compose_spec_has_no_version_key_and_all_services(compose: dict):
    assert "version" not in compose
    assert set(compose["services"]) >= SERVICES


def test_postgres_is_16_with_pg_isready_healthcheck_and_a_volume(services: dict, resolved: dict, compose: dict):
    postgres = services["postgres"]
    assert resolved["postgres"]["image"].split(":")[0] == "postgres"
    assert resolved["postgres"]["image"].split(":")[1].startswith("16")
    # overridable for local stand-ins (bench/compose-smoke.sh), official image by default
    assert interpolate(postgres["image"], {"POSTGRES_IMAGE": "local/pg:15"}) == "local/pg:15"
    test = " ".join(as_argv(postgres["healthcheck"]["test"]))
    assert "pg_isready" in test
    source = mounts_of(postgres).get("/var/lib/postgresql/data")
    assert source in (compose.get("volumes") or {}), "postgres data should live in a named volume"


def test_redis_is_7_with_ping_healthcheck(services: dict, resolved: dict):
    redis = services["redis"]
    assert resolved["redis"]["image"].split(":")[0] == "redis"
    assert resolved["redis"]["image"].split(":")[1].startswith("7")
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


def published_ports(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    result = []
    for port in service["ports"]:
        if isinstance(port, dict):
            result.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split(":")
            assert len(parts) >= 2, f"port {port!r} is not published on the host"
            host_ip = ":".join(parts[:-2]) if len(parts) > 2 else ""
            result.append((host_ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return result


def test_api_is_published_on_loopback_by_default(services: dict, resolved: dict):
    assert published_ports(resolved["api"]) == [("127.0.0.1", 8000, 8000)]
    chosen = interpolate(services["api"], {"TUNESERVE_PORT": "9000", "TUNESERVE_BIND": "0.0.0.0"})
    assert published_ports(chosen) == [("0.0.0.0", 9000, 8000)], "LAN exposure is an explicit choice"
    for name, service in resolved.items():
        assert name == "api" or not service.get("ports"), f"{name} should not be published"


def test_api_health_checks_healthz_without_curl(resolved: dict):
    api = resolved["api"]
    test = as_argv(api["healthcheck"]["test"])
    assert test[0] in ("CMD", "CMD-SHELL")
    joined = " ".join(test)
    assert "urllib" in joined and "127.0.0.1:8000/healthz" in joined.replace("localhost", "127.0.0.1")
    assert "curl" not in joined and "wget" not in joined


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_api_and_train_worker_reserve_an_nvidia_gpu(services: dict, name: str):
    devices = gpu_devices(services[name])
    assert any(
        device.get("driver") == "nvidia" and device.get("count") == 1 and "gpu" in device.get("capabilities", [])
        for device in devices
    ), devices


@pytest.mark.parametrize("name", ["migrate", "ingest", "postgres", "redis"])
def test_cpu_services_reserve_no_gpu(services: dict, name: str):
    assert not gpu_devices(services[name])


def test_ingest_and_train_are_separate_workers(services: dict):
    queues = {name: as_argv(services[name]["command"])[-1].split(",") for name in WORKERS}
    assert queues == {"worker": ["train", "batch"], "ingest": ["ingest"]}


@pytest.mark.parametrize("name", WORKERS)
def test_workers_have_a_healthcheck_that_needs_no_broker_round_trip(services: dict, name: str):
    check = services[name]["healthcheck"]
    test = as_argv(check["test"])
    assert test[:3] == ["CMD", "python", "-c"], test
    assert "celery" not in test[3] and "curl" not in test[3]
    assert duration_seconds(check["start_period"]) >= 30


@pytest.mark.parametrize(
    ("rows", "healthy"),
    [
        (["0: 0B00A8C0:D2F0 0300A8C0:18EB 01 0:0 00:0 0 10001"], True),  # established to :6379
        (["0: 0100007F:18EB 00000000:0000 0A 0:0 00:0 0 10001"], False),  # a listener on 6379 is not a client
        (["0: 0B00A8C0:D2F0 0200A8C0:1538 01 0:0 00:0 0 10001"], False),  # postgres only
        ([], False),
    ],
    ids=["connected", "listening", "other-port", "none"],
)
def test_worker_healthcheck_probe_reads_broker_connections(services: dict, tmp_path: Path, rows, healthy):
    code = as_argv(services["worker"]["healthcheck"]["test"])[3]
    assert "'/proc/net/tcp'" in code and "'/proc/net/tcp6'" in code
    table = tmp_path / "tcp"
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
    table.write_text("\n".join([header, *rows]) + "\n")
    code = code.replace("'/proc/net/tcp6'", repr(str(tmp_path / "absent"))).replace("'/proc/net/tcp'", repr(str(table)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (result.returncode == 0) is healthy, result.stderr


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


def test_secrets_are_files_under_the_secrets_dir(compose: dict):
    secrets = compose["secrets"]
    assert set(secrets) == {"postgres_password", "api_keys"}
    for name, secret in secrets.items():
        assert secret == {"file": f"{SECRETS_DIR_REF}/{name}"}, secret
    assert interpolate(secrets, {"TUNESERVE_SECRETS_DIR": "/srv/s"})["api_keys"]["file"] == "/srv/s/api_keys"


def test_no_secret_is_in_the_file_or_the_environment(raw_compose: str, resolved: dict):
    assert "POSTGRES_PASSWORD:" not in raw_compose and "${POSTGRES_PASSWORD" not in raw_compose
    assert "${TUNESERVE_API_KEYS" not in raw_compose
    for name, service in resolved.items():
        env = env_of(service)
        assert "POSTGRES_PASSWORD" not in env and "TUNESERVE_API_KEYS" not in env, name
        assert "TUNESERVE_DATABASE_PASSWORD" not in env, name


def test_postgres_reads_its_password_from_the_secret(services: dict):
    postgres = services["postgres"]
    assert "postgres_password" in secret_names(postgres)
    assert env_of(postgres)["POSTGRES_PASSWORD_FILE"] == secret_path(postgres, "postgres_password")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_read_the_same_secrets_from_files(services: dict, name: str):
    service, env = services[name], env_of(services[name])
    assert secret_names(service) >= {"postgres_password", "api_keys"}
    assert env["TUNESERVE_DATABASE_PASSWORD_FILE"] == secret_path(service, "postgres_password")
    assert env["TUNESERVE_API_KEYS_FILE"] == secret_path(service, "api_keys")


def test_interpolation_needs_no_variable(compose: dict):
    assert not re.search(r"\$\{[A-Za-z_]+:?\?", COMPOSE_FILE.read_text()), "no variable is required"
    interpolate(compose, {})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"POSTGRES_USER": "alice", "POSTGRES_DB": "tunedb"}],
    ids=["defaults", "custom-user-and-db"],
)
def test_database_url_is_psycopg_to_the_postgres_service_without_a_password(compose: dict, overrides: dict):
    services = interpolate(compose, overrides)["services"]
    postgres_env = env_of(services["postgres"])
    for name in APP_SERVICES:
        url = urlsplit(env_of(services[name])["TUNESERVE_DATABASE_URL"])
        assert url.scheme == "postgresql+psycopg"
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.username == postgres_env["POSTGRES_USER"]
        assert url.password is None, "the password comes from TUNESERVE_DATABASE_PASSWORD_FILE"
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
    verbs: dict[str, list[str]] = {}
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


# --------------------------------------------------------------------------- the CPU-only file


def without_gpu(node):
    """docker-compose.yml as a host without GPUs needs it: no deploy sections."""
    if isinstance(node, dict):
        return {key: without_gpu(value) for key, value in node.items() if key != "deploy"}
    return node


@pytest.fixture(scope="module")
def cpu_compose() -> dict:
    return yaml.safe_load(CPU_COMPOSE_FILE.read_text())


def test_cpu_file_reserves_no_gpu(cpu_compose: dict):
    assert "nvidia" not in CPU_COMPOSE_FILE.read_text().split("\nservices:", 1)[1]
    for name, service in cpu_compose["services"].items():
        assert not gpu_devices(service), name
        assert env_of(service).get("TUNESERVE_DEVICE", "${TUNESERVE_DEVICE:-cpu}") == "${TUNESERVE_DEVICE:-cpu}"


def test_cpu_file_is_the_gpu_file_less_the_gpu(compose: dict, cpu_compose: dict):
    """A complete file (compose unions device reservations across -f files, so an override could not drop
    them); this keeps it from drifting from docker-compose.yml."""
    expected = without_gpu(compose)
    actual = without_gpu(cpu_compose)
    for name in APP_SERVICES:
        expected["services"][name]["environment"]["TUNESERVE_DEVICE"] = "${TUNESERVE_DEVICE:-cpu}"
    assert size_bytes(actual["services"]["worker"].pop("shm_size")) >= 1024**3
    expected["services"]["worker"].pop("shm_size")
    # x- blocks are YAML anchors only: what compose runs is services, secrets and volumes
    assert {k: v for k, v in actual.items() if not k.startswith("x-")} == {
        k: v for k, v in expected.items() if not k.startswith("x-")
    }


# --------------------------------------------------------------------------- scripts around it


@pytest.mark.parametrize(
    "script",
    [".ci/run", ".ci/setup.sh", "bench/compose-smoke.sh", "docker/standins/build.sh",
     "docker/standins/postgres/docker-entrypoint.sh", "docker/standins/redis/docker-entrypoint.sh"],
)
def test_scripts_parse_and_are_executable(script: str):
    path = REPO_ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_ci_run_is_a_thin_caller_of_make_lint_and_make_test():
    lines = [line for line in (REPO_ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert "export CI=true" in lines and lines[-1] in ("make test", "exec make test")
    assert lines[-3:-1] == ["make test-env install", "make lint"]  # lint needs the venv; a lint failure fails CI
    assert len(lines) <= 7, lines


def test_make_test_sets_up_through_the_same_script():
    makefile = (REPO_ROOT / "Makefile").read_text()
    test_rule = re.search(r"^test:(.*)$", makefile, re.M)[1].split()
    assert "test-env" in test_rule and "install" in test_rule
    assert re.search(r"^test-env:\n\t\.ci/setup\.sh$", makefile, re.M)
    code = [line for line in (REPO_ROOT / ".ci/setup.sh").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("playwright install" in line for line in code), "tests use Debian's /usr/bin/chromium"


def test_smoke_uses_the_cpu_file_and_loopback():
    smoke = (REPO_ROOT / "bench/compose-smoke.sh").read_text()
    assert "docker-compose -f docker-compose.cpu.yml" in smoke
    assert "restart worker" in smoke and "--network none" in smoke
    assert "URL=http://127.0.0.1:" in smoke
