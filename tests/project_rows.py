"""Rows of a published model (tests.model_rows) moved into another project, for tests of project scoping."""

from shared.db import session_scope
from shared.orm import Dataset, Job, Model


def move_to_project(model_id: str, project: str) -> tuple[str, str]:
    """The model's dataset, job and model rows into ``project`` (which must exist); returns (job_id, dataset_id)."""
    with session_scope() as session:
        model = session.get_one(Model, model_id)
        for row in (model, session.get_one(Job, model.job_id), session.get_one(Dataset, model.dataset_id)):
            row.project = project
        return model.job_id, model.dataset_id
