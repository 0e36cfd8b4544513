"""``GET /v1/jobs/{id}/events``: server-sent events for one job until it reaches a final state.

Every stream opens with a full ``snapshot`` (job + history), so a client that reconnects, with or without
``Last-Event-ID``, is whole again after the first event; ids keep counting from ``Last-Event-ID`` so they
stay increasing for that client. After the snapshot come ``epoch`` (one per finished epoch, in order),
``progress`` and ``state`` events, found by polling the database (each poll its own session); the
stream sends ``end`` and closes once the job is final.
"""

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, PrincipalDep
from api.deps import SettingsDep
from api.errors import ApiError
from api.schemas import JobPublic
from api.services import jobs
from shared.config import Settings
from shared.db import get_sessionmaker
from shared.jobstate import FINAL, JobStatus
from shared.orm import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


@dataclass
class Seen:
    status: str
    progress: dict[str, Any]
    last_epoch: int
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _snapshot(job_id: str, principal: Principal) -> tuple[dict[str, Any], Seen]:
    with get_sessionmaker()() as session:
        job = jobs.get(session=session, job_id=job_id, principal=principal)
        history = jobs.history(session=session, job_id=job_id)
        public = JobPublic.from_row(job, history).model_dump(mode="json")
        progress = dict(job.progress or {})
    last = max((int(h.get("epoch", 0)) for h in history), default=0)
    return public, Seen(status=public["status"], progress=progress, last_epoch=last)


def _changes(job_id: str, seen: Seen) -> Seen:
    """What changed since ``seen``: new epochs first (oldest first), then progress, then the state."""
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        epochs = jobs.epochs_after(session=session, job_id=job_id, epoch=seen.last_epoch)
        if job is None:  # deleted under us: report it as the end of the story
            return Seen(status=seen.status, progress=seen.progress, last_epoch=seen.last_epoch,
                        events=[("end", {"status": seen.status, "reason": "job deleted"})])
        status, progress = job.status, dict(job.progress or {})
        final = {"status": status, "error": job.error, "error_code": job.error_code, "model_id": job.model_id,
                 "metrics": job.metrics, "attempts": job.attempts}
    events: list[tuple[str, dict[str, Any]]] = [("epoch", {"epoch": e, "metrics": m}) for e, m in epochs]
    if progress != seen.progress:
        events.append(("progress", progress))
    if status != seen.status:
        events.append(("state", {"previous": seen.status, **final}))
    last = epochs[-1][0] if epochs else seen.last_epoch
    return Seen(status=status, progress=progress, last_epoch=last, events=events)


def _frame(event_id: int, event: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class StreamSlots:
    """Open event streams, in all and per principal. Only the event loop touches it: no lock needed.

    The caps are for the whole API: with several API processes each holds its share (rounded up), so N
    processes together never hold more than the caps plus N - 1."""

    def __init__(self) -> None:
        self.total = 0
        self.by_principal: Counter[str] = Counter()

    def take(self, principal: Principal, settings: Settings) -> None:
        per_key, total = settings.sse_max_streams_per_key, settings.sse_max_streams
        share = settings.api_workers
        if self.total >= -(-total // share) or self.by_principal[principal.id] >= -(-per_key // share):
            split = f" (split between {share} API processes)" if share > 1 else ""
            raise ApiError(429, "too_many_streams", f"at most {per_key} event streams per key and "
                           f"{total} in all are open at once{split}; close one or poll GET /v1/jobs/{{id}}",
                           headers={"Retry-After": "10"})
        self.total += 1
        self.by_principal[principal.id] += 1

    def give_back(self, principal: Principal) -> None:
        self.total -= 1
        self.by_principal[principal.id] -= 1
        if self.by_principal[principal.id] <= 0:
            del self.by_principal[principal.id]


SLOTS = StreamSlots()


async def _stream(request: Request, job_id: str, principal: Principal, first_id: int, settings: Settings
                  ) -> AsyncIterator[str]:
    try:
        async for frame in _frames(request, job_id, principal, first_id, settings):
            yield frame
    finally:
        SLOTS.give_back(principal)


async def _frames(request: Request, job_id: str, principal: Principal, first_id: int, settings: Settings
                  ) -> AsyncIterator[str]:
    event_id = first_id
    snapshot, seen = await run_in_threadpool(_snapshot, job_id, principal)
    yield "retry: 2000\n\n"
    yield _frame(event_id, "snapshot", snapshot)
    started = last_event = time.monotonic()
    quiet = 0.0
    while JobStatus(seen.status) not in FINAL:
        await asyncio.sleep(POLL_SECONDS)
        if await request.is_disconnected():
            return
        seen = await run_in_threadpool(_changes, job_id, seen)
        for name, data in seen.events:
            event_id += 1
            yield _frame(event_id, name, data)
            if name == "end":
                return
        now = time.monotonic()
        last_event = now if seen.events else last_event
        if now - started >= settings.sse_max_seconds or now - last_event >= settings.sse_idle_seconds:
            # A stream may not hold a connection forever; the client reconnects and resumes from its id.
            yield _frame(event_id + 1, "end", {"status": seen.status, "reason": "stream time limit; reconnect "
                                               "with Last-Event-ID to go on"})
            return
        quiet = 0.0 if seen.events else quiet + POLL_SECONDS
        if quiet >= KEEPALIVE_SECONDS:  # proxies close silent connections
            quiet = 0.0
            yield ": keepalive\n\n"
    yield _frame(event_id + 1, "end", {"status": seen.status})


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}})
async def job_events(job_id: str, request: Request, principal: PrincipalDep, settings: SettingsDep,
                     last_event_id: str | None = Header(None, alias="Last-Event-ID", max_length=32)
                     ) -> StreamingResponse:
    await run_in_threadpool(_snapshot, job_id, principal)  # 404 before the stream starts, not inside it
    first_id = int(last_event_id) + 1 if last_event_id and last_event_id.isdigit() else 0
    SLOTS.take(principal, settings)
    return StreamingResponse(_stream(request, job_id, principal, first_id, settings), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
