"""Who is calling: the principal behind the bearer key, and what it may see.

Keys are checked against the database on every request (one indexed read), so a revoked key answers
401 on the very next request; nothing is cached across requests.
"""

import hmac
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.errors import ApiError
from shared.apikeys import Role, any_active, digest, env_principal_id, find_active
from shared.config import Settings, get_settings
from shared.db import get_sessionmaker
from shared.orm import ApiKey, utcnow

# last_used_at is a hint for operators, not an audit log: one write a minute per key is enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    role: Role
    projects: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin

    def can_see(self, project: str) -> bool:
        return self.is_admin or project in self.projects

    def visible(self) -> frozenset[str] | None:
        """The projects this principal may see; None means all of them."""
        return None if self.is_admin else self.projects


OPEN = Principal(id="open", name="open service", role=Role.admin)


def _unauthorized(code: str, detail: str) -> ApiError:
    return ApiError(401, code, detail, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _env_match(token: str, keys: list[str]) -> str | None:
    offered = digest(token).encode()
    # Every bootstrap key is compared so the time taken does not reveal which one (if any) matched.
    matched = [key for key in keys if hmac.compare_digest(offered, digest(key).encode())]
    return matched[0] if matched else None


def _touch(session: Session, row: ApiKey) -> None:
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()


def authenticate(*, session: Session, settings: Settings, token: str | None) -> Principal:
    env_keys = settings.api_key_list
    if token is not None:
        if env_keys and (env_key := _env_match(token, env_keys)) is not None:
            return Principal(id=env_principal_id(env_key), name="bootstrap key", role=Role.admin)
        row = find_active(session=session, secret=token)
        if row is not None:
            _touch(session, row)
            return Principal(id=row.id, name=row.name, role=Role(row.role), projects=frozenset(row.projects))
    if not env_keys and not any_active(session=session):
        return OPEN  # no keys anywhere: an open, single-user service
    if token is None:
        raise _unauthorized("missing_api_key", "send 'Authorization: Bearer <key>'")
    raise _unauthorized("invalid_api_key", "the API key is not valid (unknown or revoked)")


# Declares the bearer scheme in OpenAPI (Swagger's Authorize button); api.guard does the checking.
BEARER_SCHEME = HTTPBearer(auto_error=False, description="an API key: `tuneserve keys create`, or TUNESERVE_API_KEYS")


def get_principal(request: Request, settings: Annotated[Settings, Depends(get_settings)],
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER_SCHEME)] = None) -> Principal:
    """The principal ``api.guard`` authenticated before the body was read (or, outside it, now)."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    with get_sessionmaker()() as session:
        principal = authenticate(session=session, settings=settings,
                                 token=bearer_token(request.headers.get("authorization", "")))
    request.state.principal = principal
    return principal


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "this route needs an admin key")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]
