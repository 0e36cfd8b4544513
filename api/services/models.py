"""Model registry operations behind the routes."""

import shutil

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.services import get_or_404
from shared.config import Settings
from shared.orm import Model
from shared.storage import model_dir


def serving_id(*, session: Session) -> str | None:
    """The pinned model, else the newest one."""
    pinned = session.scalar(select(Model.id).where(Model.pinned.is_(True)).limit(1))
    if pinned:
        return pinned
    return session.scalar(select(Model.id).order_by(Model.created_at.desc(), Model.id).limit(1))


def get(*, session: Session, model_id: str) -> Model:
    return get_or_404(session, Model, "model", model_id)


def list_(*, session: Session, limit: int, offset: int) -> tuple[list[Model], int]:
    count = session.scalar(select(func.count()).select_from(Model)) or 0
    rows = session.scalars(select(Model).order_by(Model.created_at.desc(), Model.id).limit(limit).offset(offset)).all()
    return list(rows), count


def promote(*, session: Session, model_id: str) -> Model:
    model = get(session=session, model_id=model_id)
    session.execute(update(Model).where(Model.id != model_id).values(pinned=False))
    model.pinned = True
    session.commit()
    return model


def unpin(*, session: Session) -> None:
    session.execute(update(Model).values(pinned=False))
    session.commit()


def delete(*, session: Session, settings: Settings, model_id: str) -> None:
    model = get(session=session, model_id=model_id)
    if serving_id(session=session) == model_id:
        raise ApiError(409, "model_serving", f"model {model_id} is the one /predict serves; promote another first")
    session.delete(model)
    session.commit()
    shutil.rmtree(model_dir(settings, model_id), ignore_errors=True)
