"""Dependencies routes declare in their signatures."""

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from api.errors import ApiError
from shared.config import Settings, get_settings
from shared.db import get_sessionmaker


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str | None:
    """The caller's key fingerprint when keys are configured; None when the service is open."""
    keys = settings.api_key_list
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    offered = _digest(token.strip())
    # Compare against every key so the time taken does not reveal which (if any) matched.
    matched = [hmac.compare_digest(offered, _digest(key)) for key in keys]
    if not any(matched):
        raise ApiError(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    return offered.hex()[:16]


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ApiKeyDep = Annotated[str | None, Depends(require_api_key)]
IdempotencyKeyDep = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
