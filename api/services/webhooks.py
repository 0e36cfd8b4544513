"""Webhook operations behind the routes. Nothing here ever connects to a hook's URL: workers do, at
delivery time, after resolving and checking its address (worker.webhooks)."""

from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import Principal
from api.errors import ApiError
from api.schemas import WebhookCreate
from api.services import get_or_404, project_or_404, scoped
from shared.orm import DEFAULT_PROJECT, Project, Webhook, WebhookDelivery, WebhookEvent, new_id
from shared.webhooks import EVENT_TYPES, DeliveryStatus


def _check_url(url: str) -> None:
    def invalid(why: str) -> ApiError:
        return ApiError(422, "invalid_webhook_url", f"url: {why}; give an http:// or https:// URL with a host, "
                        "such as https://example.com/hooks/tuneserve")

    if any(c.isspace() or not c.isprintable() for c in url):
        raise invalid("it contains spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise invalid(f"it cannot be parsed ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise invalid(f"scheme '{parts.scheme[:16]}' is not http or https")
    if not parts.hostname:
        raise invalid("it has no host")


def create(*, session: Session, body: WebhookCreate, project: str | None, principal: Principal,
           max_per_project: int) -> Webhook:
    if project is not None and body.project is not None and body.project != project:
        raise ApiError(422, "validation_error", f"project: the URL says '{project}' but the body says "
                       f"'{body.project}'; send one")
    name = project or body.project or DEFAULT_PROJECT
    project_or_404(session, name, principal=principal)
    _check_url(body.url)
    # The project row is locked (Postgres) so two concurrent creates cannot both pass the count.
    session.execute(select(Project.name).where(Project.name == name).with_for_update())
    held = session.scalar(select(func.count()).where(Webhook.project == name)) or 0
    if held >= max_per_project:
        raise ApiError(409, "too_many_webhooks", f"project '{name}' already has {held} webhooks (limit "
                       f"{max_per_project}, TUNESERVE_WEBHOOK_MAX_PER_PROJECT); delete one first")
    events = [e for e in EVENT_TYPES if body.events is None or e in body.events]
    hook = Webhook(id=new_id(), project=name, url=body.url, secret=body.secret, events=events)
    session.add(hook)
    session.commit()
    return hook


def get(*, session: Session, hook_id: str, principal: Principal) -> Webhook:
    return get_or_404(session, Webhook, "webhook", hook_id, principal=principal)


def list_(*, session: Session, principal: Principal, project: str | None, limit: int, offset: int
          ) -> tuple[list[Webhook], int]:
    query = scoped(select(Webhook), Webhook.project, session=session, principal=principal, project=project)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Webhook.created_at.desc(), Webhook.id).limit(limit).offset(offset)).all()
    return list(rows), count


def delete(*, session: Session, hook_id: str, principal: Principal) -> None:
    """The hook and its delivery log; pending deliveries are never sent."""
    session.delete(get(session=session, hook_id=hook_id, principal=principal))
    session.commit()


def deliveries(*, session: Session, hook_id: str, principal: Principal, status: DeliveryStatus | None, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
    get(session=session, hook_id=hook_id, principal=principal)
    query = (select(WebhookDelivery, WebhookEvent.type)
             .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
             .where(WebhookDelivery.hook_id == hook_id))
    if status:
        query = query.where(WebhookDelivery.status == status)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                           .limit(limit).offset(offset)).all()
    return [{"event_id": d.event_id, "type": type_, "status": d.status, "attempts": d.attempts,
             "last_status_code": d.last_status_code, "last_error": d.last_error, "created_at": d.created_at,
             "delivered_at": d.delivered_at, "next_attempt_at": d.next_attempt_at} for d, type_ in rows], count
