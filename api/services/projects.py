"""Projects: create, read with usage, change, delete when empty."""

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import Principal
from api.errors import ApiError
from api.schemas import ProjectCreate, ProjectPublic, ProjectUpdate, Usage
from api.services import models, project_or_404
from shared.config import Settings
from shared.orm import DEFAULT_PROJECT, ApiKey, BatchPrediction, Dataset, Job, Model, Project
from shared.quota import project_usage


def to_public(*, session: Session, settings: Settings, project: Project) -> ProjectPublic:
    usage = project_usage(session=session, settings=settings, project=project.name)
    return ProjectPublic(name=project.name, description=project.description, quota_mb=project.quota_mb,
                         serving_model_id=models.serving_id(session=session, project=project.name),
                         usage=Usage(datasets=usage.datasets, jobs=usage.jobs, models=usage.models, bytes=usage.bytes),
                         created_at=project.created_at)


def create(*, session: Session, body: ProjectCreate) -> Project:
    project = Project(name=body.name, description=body.description, quota_mb=body.quota_mb)
    session.add(project)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ApiError(409, "project_exists", f"project '{body.name}' already exists") from None
    return project


def list_(*, session: Session, principal: Principal, limit: int, offset: int) -> tuple[list[Project], int]:
    query = select(Project)
    visible = principal.visible()
    if visible is not None:
        query = query.where(Project.name.in_(sorted(visible)))
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Project.name).limit(limit).offset(offset)).all()
    return list(rows), count


def update(*, session: Session, name: str, body: ProjectUpdate, principal: Principal) -> Project:
    project = project_or_404(session, name, principal=principal)
    for field in body.model_fields_set:
        setattr(project, field, getattr(body, field))
    session.commit()
    return project


def delete(*, session: Session, name: str, principal: Principal) -> None:
    project = project_or_404(session, name, principal=principal)
    if project.name == DEFAULT_PROJECT:
        raise ApiError(409, "project_protected", "project 'default' always exists; it cannot be deleted")
    held = {table.__tablename__: session.scalar(select(func.count()).where(table.project == name)) or 0
            for table in (Dataset, Job, Model, BatchPrediction)}
    if any(held.values()):
        listed = ", ".join(f"{n} {kind}" for kind, n in held.items() if n)
        raise ApiError(409, "project_not_empty", f"project '{name}' still holds {listed}; delete them first")
    # Member keys lose the project; a key left with no project can reach nothing until it is given one.
    for key in session.scalars(select(ApiKey)).all():
        if name in (key.projects or []):
            key.projects = [p for p in key.projects if p != name]
    session.delete(project)
    session.commit()
