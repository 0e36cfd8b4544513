from fastapi import APIRouter, Response

from api.auth import PrincipalDep
from api.deps import PageDep, ProjectQuery, SessionDep, SettingsDep
from api.schemas import WebhookCreate, WebhookDeliveriesPublic, WebhookDeliveryPublic, WebhookPublic, WebhooksPublic
from api.services import webhooks
from shared.webhooks import DeliveryStatus

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookPublic)
def create_webhook(body: WebhookCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
                   project: ProjectQuery = None) -> WebhookPublic:
    hook = webhooks.create(session=session, body=body, project=project, principal=principal,
                           max_per_project=settings.webhook_max_per_project)
    return WebhookPublic.model_validate(hook)


@router.get("", response_model=WebhooksPublic)
def list_webhooks(session: SessionDep, principal: PrincipalDep, page: PageDep,
                  project: ProjectQuery = None) -> WebhooksPublic:
    rows, count = webhooks.list_(session=session, principal=principal, project=project, limit=page.limit,
                                 offset=page.offset)
    return WebhooksPublic(data=[WebhookPublic.model_validate(r) for r in rows], count=count)


@router.get("/{hook_id}", response_model=WebhookPublic)
def get_webhook(hook_id: str, session: SessionDep, principal: PrincipalDep) -> WebhookPublic:
    return WebhookPublic.model_validate(webhooks.get(session=session, hook_id=hook_id, principal=principal))


@router.delete("/{hook_id}", status_code=204)
def delete_webhook(hook_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    webhooks.delete(session=session, hook_id=hook_id, principal=principal)
    return Response(status_code=204)


@router.get("/{hook_id}/deliveries", response_model=WebhookDeliveriesPublic)
def list_deliveries(hook_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep,
                    status: DeliveryStatus | None = None) -> WebhookDeliveriesPublic:
    rows, count = webhooks.deliveries(session=session, hook_id=hook_id, principal=principal, status=status,
                                      limit=page.limit, offset=page.offset)
    return WebhookDeliveriesPublic(data=[WebhookDeliveryPublic(**r) for r in rows], count=count)
