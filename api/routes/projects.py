from fastapi import APIRouter, Response

from api.auth import AdminDep, PrincipalDep
from api.deps import PageDep, SessionDep, SettingsDep
from api.predictor import PredictorDep
from api.schemas import ProjectCreate, ProjectPublic, ProjectsPublic, ProjectUpdate
from api.services import models, project_or_404, projects

router = APIRouter(prefix="/v1/projects", tags=["projects"])


@router.post("", status_code=201, response_model=ProjectPublic)
def create_project(body: ProjectCreate, session: SessionDep, settings: SettingsDep, _: AdminDep) -> ProjectPublic:
    project = projects.create(session=session, body=body)
    return projects.to_public(session=session, settings=settings, project=project)


@router.get("", response_model=ProjectsPublic)
def list_projects(session: SessionDep, settings: SettingsDep, principal: PrincipalDep, page: PageDep
                  ) -> ProjectsPublic:
    rows, count = projects.list_(session=session, principal=principal, limit=page.limit, offset=page.offset)
    return ProjectsPublic(data=[projects.to_public(session=session, settings=settings, project=p) for p in rows],
                          count=count)


@router.get("/{name}", response_model=ProjectPublic)
def get_project(name: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> ProjectPublic:
    project = project_or_404(session, name, principal=principal)
    return projects.to_public(session=session, settings=settings, project=project)


@router.patch("/{name}", response_model=ProjectPublic)
def update_project(name: str, body: ProjectUpdate, session: SessionDep, settings: SettingsDep, principal: AdminDep
                   ) -> ProjectPublic:
    project = projects.update(session=session, name=name, body=body, principal=principal)
    return projects.to_public(session=session, settings=settings, project=project)


@router.delete("/{name}", status_code=204)
def delete_project(name: str, session: SessionDep, principal: AdminDep) -> Response:
    projects.delete(session=session, name=name, principal=principal)
    return Response(status_code=204)


@router.delete("/{name}/pin", status_code=204)
def unpin_project(name: str, session: SessionDep, predictor: PredictorDep, principal: PrincipalDep) -> Response:
    """Back to serving the project's newest model."""
    project_or_404(session, name, principal=principal)
    models.unpin(session=session, project=name)
    predictor.forget_serving_id(name)
    return Response(status_code=204)
