"""Dependencies routes declare in their signatures (the caller's principal lives in ``api.auth``)."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings
from shared.db import get_sessionmaker


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int


def get_page(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=2**31 - 1)) -> Page:
    return Page(limit=limit, offset=offset)


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PageDep = Annotated[Page, Depends(get_page)]
ProjectQuery = Annotated[str | None, Query(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
                                           description="only this project's rows")]
# Stored as "<principal id>:<key>" (at most 37 + 200 characters, inside the 255 the column holds).
IdempotencyKeyDep = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
