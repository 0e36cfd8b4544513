"""API keys as principals: created, listed and revoked here, by the HTTP API and by ``tuneserve keys``.

A key is 32 random bytes shown once; the database keeps only its SHA-256. A slow password hash is not
needed for secrets with that much entropy, and a plain digest lets the lookup be one indexed read.
"""

import hashlib
import re
import secrets
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.orm import ApiKey, Project, new_id, utcnow

KEY_PREFIX = "ts_"
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class Role(StrEnum):
    admin = "admin"
    member = "member"


class KeyRequestError(ValueError):
    """A key request that names something impossible; ``code`` is the API's error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def env_principal_id(secret: str) -> str:
    """The stable id of a bootstrap key from TUNESERVE_API_KEYS (owner of its jobs, idempotency scope)."""
    return "env-" + digest(secret)[:16]


def create_key(*, session: Session, name: str, role: Role, projects: list[str]) -> tuple[ApiKey, str]:
    """A new key row and its secret (returned once, never stored)."""
    wanted = sorted(set(projects))
    known = set(session.scalars(select(Project.name).where(Project.name.in_(wanted))).all())
    missing = [p for p in wanted if p not in known]
    if missing:
        raise KeyRequestError(f"no such project: {', '.join(missing)}; create it first (POST /v1/projects)",
                        "project_not_found")
    if role == Role.member and not wanted:
        raise KeyRequestError("a member key needs at least one project in 'projects'", "projects_required")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id(), name=name, role=role.value, projects=wanted if role == Role.member else [],
                 key_hash=digest(secret), created_at=utcnow())
    session.add(row)
    session.commit()
    return row, secret


def list_keys(*, session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query).all())


def revoke_key(*, session: Session, key_id: str) -> ApiKey | None:
    """Mark the key revoked (it answers 401 from the next request on); None if there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def find_active(*, session: Session, secret: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest(secret)))
    return row if row is not None and row.revoked_at is None else None


def any_active(*, session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
