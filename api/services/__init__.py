"""Plain functions behind the routes, one module per resource.

Rows of a project the caller may not see are treated exactly like rows that do not exist (404), so
another team can learn nothing, not even whether an id is in use.
"""

import uuid
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from api.auth import Principal
from api.errors import not_found
from shared.apikeys import PROJECT_NAME
from shared.orm import Project


class Owned(Protocol):
    project: Any


Row = TypeVar("Row", bound=Owned)


def get_or_404(session: Session, table: type[Row], kind: str, item_id: str, *, principal: Principal) -> Row:
    """The row with this id if the caller may see it, else a 404 that names it; ids that are not UUIDs
    never reach the database."""
    try:
        uuid.UUID(item_id)
    except ValueError:
        raise not_found(kind, item_id) from None
    row = session.get(table, item_id)
    if row is None or not principal.can_see(row.project):
        raise not_found(kind, item_id)
    return row


def project_or_404(session: Session, name: str, *, principal: Principal) -> Project:
    # A name that cannot exist (a NUL byte, say) never reaches the database.
    project = session.get(Project, name) if PROJECT_NAME.fullmatch(name) else None
    if project is None or not principal.can_see(project.name):
        raise not_found("project", name)
    return project


def scoped(query: Select[Any], column: InstrumentedAttribute[str], *, session: Session, principal: Principal,
           project: str | None) -> Select[Any]:
    """``query`` limited to the projects the caller may see, and to ``project`` when one is asked for."""
    if project is not None:
        project_or_404(session, project, principal=principal)
        return query.where(column == project)
    visible = principal.visible()
    return query if visible is None else query.where(column.in_(sorted(visible)))
