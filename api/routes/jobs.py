from fastapi import APIRouter, Response

from api.auth import PrincipalDep
from api.deps import IdempotencyKeyDep, PageDep, ProjectQuery, SessionDep, SettingsDep
from api.schemas import JobCreate, JobPublic, JobsPublic
from api.services import jobs
from shared.jobstate import JobStatus
from shared.orm import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def to_public(job: Job, history: list[dict] | None = None) -> JobPublic:
    public = JobPublic.model_validate(job)
    public.history = history or []
    return public


@router.post("", status_code=202, response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
               idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    job = jobs.create(session=session, body=body, idempotency_key=idempotency_key, principal=principal,
                      max_active=settings.max_active_jobs_per_key)
    return to_public(job, jobs.history(session=session, job_id=job.id))


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, principal: PrincipalDep, page: PageDep, project: ProjectQuery = None,
              status: JobStatus | None = None, dataset_id: str | None = None) -> JobsPublic:
    rows, count = jobs.list_(session=session, principal=principal, project=project, status=status,
                             dataset_id=dataset_id, limit=page.limit, offset=page.offset)
    return JobsPublic(data=[to_public(r) for r in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobPublic:
    job = jobs.get(session=session, job_id=job_id, principal=principal)
    return to_public(job, jobs.history(session=session, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> JobPublic:
    job = jobs.cancel(session=session, settings=settings, job_id=job_id, principal=principal)
    return to_public(job, jobs.history(session=session, job_id=job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> Response:
    jobs.delete(session=session, settings=settings, job_id=job_id, principal=principal)
    return Response(status_code=204)
