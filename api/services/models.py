"""Model registry operations behind the routes. Each project serves its pinned model, else its newest."""

import shutil

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.auth import Principal
from api.errors import ApiError
from api.schemas import ModelUpdate
from api.services import get_or_404, scoped
from shared.config import Settings
from shared.orm import Model
from shared.storage import model_dir


def serving_id(*, session: Session, project: str) -> str | None:
    """The project's pinned model, else its newest one."""
    pinned = session.scalar(select(Model.id).where(Model.project == project, Model.pinned.is_(True))
                            .order_by(Model.created_at.desc()).limit(1))
    if pinned:
        return pinned
    return session.scalar(select(Model.id).where(Model.project == project)
                          .order_by(Model.created_at.desc(), Model.id).limit(1))


def get(*, session: Session, model_id: str, principal: Principal) -> Model:
    return get_or_404(session, Model, "model", model_id, principal=principal)


def list_(*, session: Session, principal: Principal, project: str | None, limit: int, offset: int
          ) -> tuple[list[Model], int]:
    query = scoped(select(Model), Model.project, session=session, principal=principal, project=project)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Model.created_at.desc(), Model.id).limit(limit).offset(offset)).all()
    return list(rows), count


def serving_ids(*, session: Session, models: list[Model]) -> set[str]:
    """Which of ``models`` their projects serve right now."""
    return {sid for project in {m.project for m in models} if (sid := serving_id(session=session, project=project))}


def promote(*, session: Session, model_id: str, principal: Principal) -> Model:
    model = get(session=session, model_id=model_id, principal=principal)
    session.execute(update(Model).where(Model.project == model.project, Model.id != model_id).values(pinned=False))
    model.pinned = True
    session.commit()
    return model


def set_thresholds(*, session: Session, model_id: str, body: ModelUpdate, principal: Principal) -> Model:
    """Set the abstain thresholds; fields left out of the body keep their value."""
    model = get(session=session, model_id=model_id, principal=principal)
    fields = body.model_fields_set
    if "min_score" in fields:
        model.min_score = body.min_score or 0.0  # null: back to never abstaining
    if "class_min_scores" in fields:
        unknown = sorted(set(body.class_min_scores or {}) - set(model.classes))
        if unknown:
            raise ApiError(422, "unknown_class", f"class_min_scores: {unknown[:5]} are not classes of model "
                           f"{model_id} (it has {model.classes[:10]})")
        model.class_min_scores = body.class_min_scores or None
    session.commit()
    return model


def thresholds(*, session: Session, model_id: str) -> tuple[float, dict[str, float]]:
    """(min_score, per-class overrides) of a model, read on every prediction so a PATCH reaches every process."""
    row = session.execute(select(Model.min_score, Model.class_min_scores).where(Model.id == model_id)).one_or_none()
    if row is None:
        return 0.0, {}
    return float(row.min_score), dict(row.class_min_scores or {})


def unpin(*, session: Session, project: str) -> None:
    session.execute(update(Model).where(Model.project == project).values(pinned=False))
    session.commit()


def delete(*, session: Session, settings: Settings, model_id: str, principal: Principal, force: bool) -> Model:
    """Remove a model; the one its project serves only with ``force`` (the project then serves the next)."""
    model = get(session=session, model_id=model_id, principal=principal)
    if not force and serving_id(session=session, project=model.project) == model_id:
        raise ApiError(409, "model_serving", f"model {model_id} is the one project '{model.project}' serves; "
                       "promote another first, or add ?force=true")
    session.delete(model)
    session.commit()
    shutil.rmtree(model_dir(settings, model_id), ignore_errors=True)
    return model
