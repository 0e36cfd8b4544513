import uuid

from fastapi import APIRouter, Response

from api.auth import AdminDep
from api.deps import SessionDep
from api.errors import ApiError, not_found
from api.schemas import KeyCreate, KeyCreated, KeyPublic, KeysPublic
from shared import apikeys

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, _: AdminDep) -> KeyCreated:
    try:
        row, secret = apikeys.create_key(session=session, name=body.name, role=body.role, projects=body.projects)
    except apikeys.KeyRequestError as exc:
        raise ApiError(422, exc.code, str(exc)) from exc
    return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=secret)


@router.get("", response_model=KeysPublic)
def list_keys(session: SessionDep, _: AdminDep, include_revoked: bool = False) -> KeysPublic:
    rows = apikeys.list_keys(session=session, include_revoked=include_revoked)
    return KeysPublic(data=[KeyPublic.model_validate(r) for r in rows], count=len(rows))


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: str, session: SessionDep, _: AdminDep) -> Response:
    try:
        uuid.UUID(key_id)  # ids that are not UUIDs (a NUL byte, say) never reach the database
    except ValueError:
        raise not_found("key", key_id) from None
    if apikeys.revoke_key(session=session, key_id=key_id) is None:
        raise not_found("key", key_id)
    return Response(status_code=204)
