"""The job state machine: legal moves succeed once, illegal ones are refused, races have one winner."""

import functools
import itertools
import threading

import pytest

from shared.db import session_scope
from shared.jobstate import ALLOWED, FINAL, IllegalTransition, JobStatus, transition
from shared.orm import Job
from tests.helpers import job_row, ready_dataset, run_in_threads

LEGAL = [(a, b) for a, targets in ALLOWED.items() for b in targets]
ILLEGAL = [(a, b) for a, b in itertools.product(JobStatus, JobStatus) if b not in ALLOWED[a]]


def status_of(job_id: str) -> str:
    with session_scope() as session:
        return session.get_one(Job, job_id).status


def test_the_diagram_is_the_one_in_the_design():
    assert set(LEGAL) == {
        (JobStatus.queued, JobStatus.running), (JobStatus.queued, JobStatus.cancelled),
        (JobStatus.queued, JobStatus.failed), (JobStatus.running, JobStatus.succeeded),
        (JobStatus.running, JobStatus.failed), (JobStatus.running, JobStatus.cancelling),
        (JobStatus.running, JobStatus.queued), (JobStatus.cancelling, JobStatus.cancelled),
        (JobStatus.cancelling, JobStatus.failed),
    }
    assert all(not ALLOWED[final] for final in FINAL)


@pytest.mark.parametrize(("start", "end"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_transition_happens_once(migrated, start, end):
    job_id = job_row(ready_dataset(), start)
    with session_scope() as session:
        assert transition(session=session, job_id=job_id, expected=start, to=end) is True
    assert status_of(job_id) == end
    with session_scope() as session:  # the same move again finds the job no longer in `start`
        assert transition(session=session, job_id=job_id, expected=start, to=end) is False
    assert status_of(job_id) == end


@pytest.mark.parametrize(("start", "end"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transition_is_refused_and_changes_nothing(migrated, start, end):
    job_id = job_row(ready_dataset(), start)
    with session_scope() as session, pytest.raises(IllegalTransition):
        transition(session=session, job_id=job_id, expected=start, to=end)
    assert status_of(job_id) == start


def test_stale_expectation_changes_nothing(migrated):
    job_id = job_row(ready_dataset(), JobStatus.succeeded)
    with session_scope() as session:
        assert transition(session=session, job_id=job_id, expected=JobStatus.running, to=JobStatus.failed) is False
    assert status_of(job_id) == JobStatus.succeeded


@pytest.mark.parametrize("targets", [
    [JobStatus.running] * 8,
    [JobStatus.running, JobStatus.cancelled] * 4,
])
def test_racing_threads_have_exactly_one_winner(migrated, targets):
    job_id = job_row(ready_dataset(), JobStatus.queued)
    # A timeout breaks the barrier for the others if one thread fails before it, instead of hanging them.
    barrier = threading.Barrier(len(targets), timeout=30)

    def race(to: JobStatus) -> tuple[JobStatus, bool]:
        with session_scope() as session:
            barrier.wait()
            return to, transition(session=session, job_id=job_id, expected=JobStatus.queued, to=to)

    results = run_in_threads([functools.partial(race, to) for to in targets])
    assert sorted(won for _, won in results) == [False] * (len(targets) - 1) + [True]
    [winner] = [to for to, won in results if won]
    assert status_of(job_id) == winner
