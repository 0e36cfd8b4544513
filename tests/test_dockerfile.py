"""Static checks of Dockerfile.gpu and .dockerignore (Docker cannot run where the tests run)."""

import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile.gpu"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
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


def test_dockerfile_default_command_is_tuneserve(instructions: list[tuple[str, str]]):
    commands = [args for keyword, args in instructions if keyword in ("CMD", "ENTRYPOINT")]
    assert commands
    first = commands[-1]
    argv = yaml.safe_load(first) if first.startswith("[") else shlex.split(first)
    assert argv[0] == "tuneserve"


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
