from fastapi import APIRouter, Query

from api.deps import ApiKeyDep, IdempotencyKeyDep, SessionDep, SettingsDep
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
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, owner: ApiKeyDep,
               idempotency_key: IdempotencyKeyDep = None) -> JobPublic:
    job = jobs.create(session=session, body=body, idempotency_key=idempotency_key, owner=owner,
                      max_active=settings.max_active_jobs_per_key)
    return to_public(job, jobs.history(session=session, job_id=job.id))


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, _: ApiKeyDep, status: JobStatus | None = None, dataset_id: str | None = None,
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=2**31 - 1)) -> JobsPublic:
    rows, count = jobs.list_(session=session, status=status, dataset_id=dataset_id, limit=limit, offset=offset)
    return JobsPublic(data=[to_public(r) for r in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, _: ApiKeyDep) -> JobPublic:
    job = jobs.get(session=session, job_id=job_id)
    return to_public(job, jobs.history(session=session, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, _: ApiKeyDep) -> JobPublic:
    job = jobs.cancel(session=session, job_id=job_id)
    return to_public(job, jobs.history(session=session, job_id=job_id))
