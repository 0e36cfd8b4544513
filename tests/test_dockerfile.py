"""Static checks of Dockerfile.gpu and .dockerignore, and the container entrypoint (docker/entrypoint.py)
run as a plain process. Docker need not run where the tests run; bench/compose-smoke.sh builds for real."""

import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile.gpu"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.py"
PYPROJECT = REPO_ROOT / "pyproject.toml"
WEIGHTS = (
    "ResNet18_Weights.IMAGENET1K_V1",
    "ResNet34_Weights.IMAGENET1K_V1",
    "ResNet50_Weights.IMAGENET1K_V2",
    "ResNet101_Weights.IMAGENET1K_V2",
)


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "dangling line continuation at the end of the Dockerfile"
    return instructions


def env_assignments(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def resolve_args(text: str, instructions: list[tuple[str, str]]) -> str:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")
    for name, value in defaults.items():
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


def pyproject_pin(distribution: str) -> str:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [dep.split("==", 1)[1] for dep in dependencies if dep.split("==")[0].strip() == distribution]
    assert pins, f"pyproject does not pin {distribution}"
    return pins[0].strip()


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions()


def test_dockerfile_runs_as_non_root(instructions: list[tuple[str, str]]):
    users = [(index, args) for index, (keyword, args) in enumerate(instructions) if keyword == "USER"]
    assert users, "no USER instruction: the image would run as root"
    index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert all(keyword not in ("RUN", "COPY", "ADD") for keyword, _ in instructions[index + 1 :]), (
        "USER should come after the build steps"
    )


def test_dockerfile_sets_env(instructions: list[tuple[str, str]]):
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(env_assignments(args))
    assert env.get("TORCH_HOME", "").startswith("/")
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert ("EXPOSE", "8000") in instructions


def test_dockerfile_bakes_imagenet_weights_into_torch_home(instructions: list[tuple[str, str]]):
    torch_home_at = min(
        index
        for index, (keyword, args) in enumerate(instructions)
        if keyword == "ENV" and "TORCH_HOME" in env_assignments(args)
    )
    weight_runs = [
        index
        for index, (keyword, args) in enumerate(instructions)
        if keyword == "RUN" and "--network=none" not in args and all(weight in args for weight in WEIGHTS)
    ]
    assert weight_runs, f"no RUN downloads all of {WEIGHTS}"
    assert weight_runs[0] > torch_home_at, "weights must be downloaded after TORCH_HOME is set"


def test_dockerfile_installs_the_pinned_torch(instructions: list[tuple[str, str]]):
    torch, torchvision = pyproject_pin("torch"), pyproject_pin("torchvision")
    assert torch == "2.14.1"
    base = next(args for keyword, args in instructions if keyword == "FROM")
    runs = resolve_args(" ".join(args for keyword, args in instructions if keyword == "RUN"), instructions)
    assert torch in base or f"torch=={torch}" in runs
    assert torch in base or f"torchvision=={torchvision}" in runs


def test_dockerfile_is_layer_cache_friendly_and_copies_every_package(instructions: list[tuple[str, str]]):
    copies = [(index, args.split()) for index, (keyword, args) in enumerate(instructions) if keyword == "COPY"]
    pyproject_at = next(index for index, args in copies if "pyproject.toml" in args[:-1])
    packages = {"api", "worker", "shared", "migrations"}
    package_copies = {
        index: source.rstrip("/").removeprefix("./")
        for index, args in copies
        for source in args[:-1]
        if source.rstrip("/").removeprefix("./") in packages
    }
    assert set(package_copies.values()) == packages
    assert pyproject_at < min(package_copies), "copy pyproject.toml (and install deps) before the source"
    assert any(keyword == "RUN" for keyword, _ in instructions[pyproject_at + 1 : min(package_copies)])


def test_dockerfile_default_command_is_tuneserve_through_the_entrypoint(instructions: list[tuple[str, str]]):
    commands = [args for keyword, args in instructions if keyword == "CMD"]
    assert commands
    argv = yaml.safe_load(commands[-1])
    assert argv[0] == "tuneserve"
    entrypoint = yaml.safe_load(next(args for keyword, args in reversed(instructions) if keyword == "ENTRYPOINT"))
    assert entrypoint[0] == "python" and len(entrypoint) == 2, "exec form: the command's signals reach it"
    copied = [args.split() for keyword, args in instructions if keyword == "COPY"]
    assert ["docker/entrypoint.py", entrypoint[1]] in copied


def test_dockerfile_base_image_is_an_argument_defaulting_to_official_python(instructions: list[tuple[str, str]]):
    raw = DOCKERFILE.read_text()
    assert not any(line.lstrip().lower().startswith("# syntax") for line in raw.splitlines()), (
        "no `# syntax=` line: it needs BuildKit and a registry")
    first = instructions[0]
    assert first[0] == "ARG" and first[1].split("=", 1)[0] == "BASE_IMAGE"
    default = first[1].split("=", 1)[1].strip("\"'")
    assert default.startswith("python:3.11-slim"), default
    assert [args for keyword, args in instructions if keyword == "FROM"] == ["${BASE_IMAGE}"]


def test_dockerfile_builds_with_the_classic_builder(instructions: list[tuple[str, str]]):
    """BuildKit-only flags fail on the classic builder (and on older engines)."""
    for keyword, args in instructions:
        if keyword == "RUN":
            assert not args.startswith(("--network", "--mount", "--security")), args
        if keyword in ("COPY", "ADD"):
            assert not args.startswith(("--link", "--chmod", "--parents", "--exclude")), args


def test_imagenet_weights_can_be_switched_off_and_default_on(instructions: list[tuple[str, str]]):
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None
            for keyword, a in instructions if keyword == "ARG"}
    assert args.get("IMAGENET_WEIGHTS") == "1"
    weight_run = next(a for keyword, a in instructions if keyword == "RUN" and all(w in a for w in WEIGHTS))
    assert '"$IMAGENET_WEIGHTS" = 1' in weight_run and '"$IMAGENET_WEIGHTS" = 0' in weight_run
    # the offline proof: loading again with every proxy pointed at a closed port
    assert "HTTPS_PROXY=http://127.0.0.1:9" in weight_run and "get_state_dict" in weight_run


def test_pip_mirror_arguments_are_declared_without_defaults(instructions: list[tuple[str, str]]):
    declared = {a for keyword, a in instructions if keyword == "ARG"}
    # no default: an unset ARG is not exported, so pip keeps its own index unless one is given
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= declared


def test_dockerignore_keeps_the_entrypoint_in_the_context():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert "secrets/" in patterns and "docker/standins/" in patterns
    assert not any(p.rstrip("/") in ("docker", "docker/*", "docker/entrypoint.py", "*.py") for p in patterns)


# --------------------------------------------------------------------------- the entrypoint, as a process

SHOW_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def run_entrypoint(env: dict[str, str], argv: list[str] | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "TORCH_HOME": "/nonexistent-torch-home"}
    return subprocess.run([sys.executable, str(ENTRYPOINT), *(argv or SHOW_ENV)], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_entrypoint_reads_secret_files_and_quotes_the_password_into_the_url(tmp_path: Path):
    password = "p@ss:w/rd?#%+ é"
    (tmp_path / "pw").write_text(password + "\n")
    (tmp_path / "keys").write_text("k1,k2\n")
    result = run_entrypoint({
        "TUNESERVE_DATABASE_URL": "postgresql+psycopg://tuneserve@postgres:5432/tuneserve",
        "TUNESERVE_DATABASE_PASSWORD_FILE": str(tmp_path / "pw"),
        "TUNESERVE_API_KEYS_FILE": str(tmp_path / "keys"),
    })
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout)
    url = urlsplit(env["TUNESERVE_DATABASE_URL"])
    assert (url.username, unquote(url.password), url.hostname, url.port, url.path) == (
        "tuneserve", password, "postgres", 5432, "/tuneserve")
    from sqlalchemy.engine import make_url

    assert make_url(env["TUNESERVE_DATABASE_URL"]).password == password
    assert env["TUNESERVE_API_KEYS"] == "k1,k2"
    assert not any(name.endswith("_FILE") or name == "TUNESERVE_DATABASE_PASSWORD" for name in env)


def test_entrypoint_empty_api_keys_file_means_an_open_service(tmp_path: Path):
    (tmp_path / "keys").write_text("")
    result = run_entrypoint({"TUNESERVE_API_KEYS_FILE": str(tmp_path / "keys")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["TUNESERVE_API_KEYS"] == ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TUNESERVE_API_KEYS": "a", "TUNESERVE_API_KEYS_FILE": "{tmp}/keys"}, "both TUNESERVE_API_KEYS and"),
        ({"TUNESERVE_API_KEYS_FILE": "{tmp}"}, "is a directory"),
        ({"TUNESERVE_API_KEYS_FILE": "{tmp}/absent"}, "cannot read TUNESERVE_API_KEYS_FILE"),
        ({"TUNESERVE_DATABASE_PASSWORD_FILE": "{tmp}/keys"}, "TUNESERVE_DATABASE_URL is not"),
        ({"TUNESERVE_DATABASE_PASSWORD_FILE": "{tmp}/keys", "TUNESERVE_DATABASE_URL": "postgresql://u:p@h/d"},
         "already holds a password"),
    ],
    ids=["both", "directory", "missing", "no-url", "two-passwords"],
)
def test_entrypoint_refuses_unclear_secrets(tmp_path: Path, env: dict[str, str], message: str):
    (tmp_path / "keys").write_text("x")
    result = run_entrypoint({name: value.format(tmp=tmp_path) for name, value in env.items()})
    assert result.returncode == 78 and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("argv", "weights", "warned"),
    [(["api"], False, True), (["worker", "--help"], False, True), (["api"], True, False), (["migrate"], False, False)],
    ids=["api-without", "worker-without", "api-with", "migrate"],
)
def test_entrypoint_says_when_imagenet_weights_are_absent(tmp_path: Path, argv, weights: bool, warned: bool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tuneserve").write_text("#!/bin/sh\necho started \"$@\"\n")
    (bin_dir / "tuneserve").chmod(0o755)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if weights:
        (checkpoints / "resnet50-11ad3fa6.pth").write_bytes(b"")
    result = run_entrypoint({"PATH": f"{bin_dir}:/usr/bin:/bin", "TORCH_HOME": str(tmp_path / "torch")},
                            ["tuneserve", *argv])
    assert result.returncode == 0 and result.stdout.strip() == "started " + " ".join(argv)
    assert ("holds no ImageNet weights" in result.stderr) is warned, result.stderr
    if warned:
        assert "IMAGENET_WEIGHTS=0" in result.stderr and '"weights": "none"' in result.stderr


def test_dockerignore_keeps_junk_out_but_not_the_sources(instructions: list[tuple[str, str]]):
    patterns = {
        line.strip().rstrip("/").removeprefix("**/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "var", ".git", "__pycache__"} <= patterns
    copied = {
        source.rstrip("/").removeprefix("./")
        for keyword, args in instructions
        if keyword == "COPY"
        for source in args.split()[:-1]
        if not source.startswith("--")
    }
    assert copied and not copied & patterns, copied & patterns
