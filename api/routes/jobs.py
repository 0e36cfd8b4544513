import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.auth import PrincipalDep
from api.deps import IdempotencyKeyDep, PageDep, ProjectQuery, SessionDep, SettingsDep
from api.schemas import JobCreate, JobPublic, JobsPublic
from api.services import jobs
from shared.jobstate import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
               idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    job = jobs.create(session=session, body=body, idempotency_key=idempotency_key, principal=principal,
                      max_active=settings.max_active_jobs_per_key,
                      weights_dir=settings.weights_path if settings.check_weights else None)
    return JobPublic.from_row(job, jobs.history(session=session, job_id=job.id))


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, principal: PrincipalDep, page: PageDep, project: ProjectQuery = None,
              status: JobStatus | None = None, dataset_id: str | None = None) -> JobsPublic:
    rows, count = jobs.list_(session=session, principal=principal, project=project, status=status,
                             dataset_id=dataset_id, limit=page.limit, offset=page.offset)
    return JobsPublic(data=[JobPublic.from_row(r) for r in rows], count=count)


def matches(etag: str, if_none_match: str | None) -> bool:
    """If-None-Match's weak comparison: any listed tag (W/ or not) equal to ``etag``, or ``*``."""
    tags = [t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")]
    return "*" in tags or etag in tags


@router.get("/{job_id}", response_model=JobPublic,
            responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}})
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep,
            if_none_match: Annotated[str | None, Header(max_length=2048)] = None) -> Response:
    """Pollers send the ETag back in If-None-Match and get an empty 304 until the job changes."""
    job = jobs.get(session=session, job_id=job_id, principal=principal)
    body = JobPublic.from_row(job, jobs.history(session=session, job_id=job_id)).model_dump_json().encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if matches(etag, if_none_match):
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> JobPublic:
    job = jobs.cancel(session=session, settings=settings, job_id=job_id, principal=principal)
    return JobPublic.from_row(job, jobs.history(session=session, job_id=job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> Response:
    jobs.delete(session=session, settings=settings, job_id=job_id, principal=principal)
    return Response(status_code=204)
