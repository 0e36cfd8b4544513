"""Reading compose files as compose does: variable interpolation (``${VAR:-default}``, ``${VAR:?message}``,
``$$``), commands, environments, mounts, durations and sizes. Used by tests/test_compose.py."""

import re
import shlex


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
