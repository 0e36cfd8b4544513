"""Server verbs for teams, straight against the database (no HTTP, like ``migrate``): ``tuneserve keys
create|list|revoke`` and ``tuneserve projects create|list``. Run them where TUNESERVE_DATABASE_URL points
at the service's database, e.g. to make the first admin key before any key exists."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from shared.apikeys import PROJECT_NAME, KeyRequestError, Role, create_key, list_keys, revoke_key
from shared.cli_app import app, console, fail

keys_app = typer.Typer(help="API keys (principals): create, list, revoke. Talks to the database directly.",
                       no_args_is_help=True)
projects_app = typer.Typer(help="Projects: create, list. Talks to the database directly.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")

Json = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


@contextmanager
def _session() -> Iterator[Session]:
    from shared.db import get_sessionmaker

    try:
        with get_sessionmaker()() as session:
            yield session
    except SQLAlchemyError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"database error: {first[:300]}; check TUNESERVE_DATABASE_URL and run `tuneserve migrate`", code=2)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _key_body(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "role": row.role, "projects": list(row.projects or []),
            "created_at": _iso(row.created_at), "last_used_at": _iso(row.last_used_at),
            "revoked_at": _iso(row.revoked_at)}


def _short_time(iso: str | None) -> str:
    return (iso or "")[:16].replace("T", " ")


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option("--name", help="who or what holds the key")],
                role: Annotated[Role, typer.Option("--role", help="admin sees everything; member only its "
                                                   "projects")] = Role.member,
                project: Annotated[list[str] | None, typer.Option("--project", help="a project the key may see "
                                                                  "(repeat for several; members need one)")] = None,
                as_json: Json = False) -> None:
    """Create a key and print its secret: shown this once, stored only as a hash."""
    if not 1 <= len(name) <= 100:
        fail("--name must be 1 to 100 characters")
    with _session() as session:
        try:
            row, secret = create_key(session=session, name=name, role=role, projects=project or [])
        except KeyRequestError as exc:
            fail(f"{exc} ({exc.code})")
        body = _key_body(row) | {"key": secret}
    if as_json:
        _print_json(body)
        return
    console.print(f"created {body['role']} key '{body['name']}'", highlight=False)
    console.print(f"id       {body['id']}", highlight=False)
    if body["role"] == Role.member:
        console.print(f"projects {', '.join(body['projects'])}", highlight=False)
    console.print(f"key      {secret}", highlight=False, soft_wrap=True)
    console.print("The key is shown only now (the database keeps its hash): store it, "
                  "then send it as 'Authorization: Bearer <key>'.", highlight=False)


@keys_app.command("list")
def keys_list(include_revoked: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
              as_json: Json = False) -> None:
    """List keys (never their secrets)."""
    with _session() as session:
        rows = [_key_body(r) for r in list_keys(session=session, include_revoked=include_revoked)]
    if as_json:
        _print_json({"data": rows, "count": len(rows)})
        return
    if not rows:
        console.print("no keys" + ("" if include_revoked else " (--all shows revoked ones)"), highlight=False)
        return
    table = Table()
    for column in ("id", "name", "role", "projects", "created", "last used") + (("revoked",) if include_revoked
                                                                                 else ()):
        table.add_column(column, no_wrap=column == "id", overflow="fold")
    for r in rows:
        cells = [r["id"], r["name"], r["role"], ", ".join(r["projects"]) or ("all" if r["role"] == "admin" else "–"),
                 _short_time(r["created_at"]), _short_time(r["last_used_at"]) or "never"]
        table.add_row(*cells, *((_short_time(r["revoked_at"]),) if include_revoked else ()))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (from `tuneserve keys list`)")]) -> None:
    """Revoke a key: it answers 401 from its next request on."""
    with _session() as session:
        row = revoke_key(session=session, key_id=key_id) if len(key_id) <= 64 else None
        if row is None:
            fail(f"key {key_id} does not exist (key_not_found)")
        console.print(f"revoked key {row.id} '{row.name}'", highlight=False)


@projects_app.command("create")
def projects_create(name: Annotated[str, typer.Argument(help="lower-case letters, digits and '-'; at most 63")],
                    quota_mb: Annotated[int | None, typer.Option("--quota-mb", min=1, max=2**31 - 1,
                                                                 help="disk the project may hold")] = None,
                    description: Annotated[str, typer.Option("--description", help="free text")] = "",
                    as_json: Json = False) -> None:
    """Create a project ('default' always exists)."""
    from shared.orm import Project

    if not PROJECT_NAME.match(name):
        fail(f"'{name[:70]}' is not a project name: lower-case letters, digits and '-', starting with a letter "
             "or digit, at most 63 characters")
    with _session() as session:
        session.add(Project(name=name, description=description, quota_mb=quota_mb))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            fail(f"project '{name}' already exists (project_exists)")
        row = session.get(Project, name)
        assert row is not None  # just committed
        body = {"name": row.name, "description": row.description, "quota_mb": row.quota_mb,
                "created_at": _iso(row.created_at)}
    if as_json:
        _print_json(body)
    else:
        quota = f" (quota {quota_mb} MiB)" if quota_mb else ""
        console.print(f"created project {name}{quota}", highlight=False)


@projects_app.command("list")
def projects_list(as_json: Json = False) -> None:
    """List projects with what they hold (datasets, jobs, models, bytes on disk)."""
    from sqlalchemy import select

    from shared.config import get_settings
    from shared.orm import Project
    from shared.quota import project_usage

    settings = get_settings()
    with _session() as session:
        rows: list[dict[str, Any]] = []
        for p in session.scalars(select(Project).order_by(Project.name)).all():
            usage = project_usage(session=session, settings=settings, project=p.name)
            rows.append({"name": p.name, "description": p.description, "quota_mb": p.quota_mb,
                         "usage": {"datasets": usage.datasets, "jobs": usage.jobs, "models": usage.models,
                                   "bytes": usage.bytes}, "created_at": _iso(p.created_at)})
    if as_json:
        _print_json({"data": rows, "count": len(rows)})
        return
    table = Table()
    for column in ("project", "datasets", "jobs", "models", "MiB used", "quota MiB", "description"):
        table.add_column(column, justify="right" if column in ("datasets", "jobs", "models", "MiB used", "quota MiB")
                         else "left")
    for r in rows:
        u = r["usage"]
        table.add_row(r["name"], str(u["datasets"]), str(u["jobs"]), str(u["models"]), f"{u['bytes'] / 2**20:.1f}",
                      str(r["quota_mb"] or "–"), r["description"])
    console.print(table)
