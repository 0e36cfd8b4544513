"""The door every request passes before any route: who is calling, and how many body bytes it may send.

Authentication happens here, before a single body byte is read, so an anonymous client cannot make the
API buffer a large body just to be told 401. Bodies that are not multipart uploads (which routes stream
to disk under their own limits) are capped while they arrive: a 100 MB JSON document is refused after
the first megabyte, or at once when Content-Length already says so.
"""

import json
import re
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import authenticate, bearer_token
from api.errors import DB_UNAVAILABLE, PROBLEM_JSON, ApiError, TrackedSend, problem
from shared.config import get_settings
from shared.db import get_sessionmaker

# Paths that hold no team data: health for load balancers, the UI shell and its static assets, and the
# API docs pages (the schema they load, /openapi.json, still needs a key).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/ui/config.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/favicon.ico", "/v2", "/v2/health/live", "/v2/health/ready"})
PUBLIC_PREFIXES = ("/static/", "/static-docs/")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Open Inference Protocol requests carry their tensors in the (non-multipart) body, held in memory: they get
# the size of one image upload (TUNESERVE_MAX_IMAGE_MB) instead of the JSON limit.
OIP_INFER = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer")
# Every answer: no MIME sniffing, no framing, no referrer. The UI page also gets a policy that lets it
# load only its own scripts, styles and API (the page has no inline script to allow).
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
UI_POLICY = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body; an HTTPException so FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, _too_large(limit, setting)["detail"])


def is_public(scope: Scope) -> bool:
    path = scope.get("path", "")
    if path == "/metrics":
        return get_settings().metrics_open
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _answer(send: Send, scope: Scope, status: int, body: dict[str, str],
                  headers: dict[str, str] | None = None) -> None:
    full = problem(status, body["code"], body["detail"], path=scope.get("path", ""))
    payload = json.dumps(full, separators=(",", ":")).encode()  # as JSONResponse writes it
    raw = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _authenticate(token: str | None) -> Any:
    with get_sessionmaker()() as session:
        return authenticate(session=session, settings=get_settings(), token=token)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


def _is_multipart(scope: Scope) -> bool:
    return any(name == b"content-type" and value.lower().startswith(b"multipart/form-data")
               for name, value in scope.get("headers") or [])


def _body_limit(scope: Scope) -> tuple[int, str]:
    """The most body bytes a non-multipart request may send, and the setting that says so."""
    settings = get_settings()
    if OIP_INFER.fullmatch(scope.get("path", "")):
        return settings.max_image_mb * 2**20, "TUNESERVE_MAX_IMAGE_MB"
    return settings.max_json_kb * 1024, "TUNESERVE_MAX_JSON_KB"


def _too_large(limit: int, setting: str = "TUNESERVE_MAX_JSON_KB") -> dict[str, str]:
    return {"detail": f"the request body is larger than {limit // 1024} KiB ({setting}); "
                      "send less, or upload files as multipart/form-data", "code": "payload_too_large"}


class GuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = SECURITY_HEADERS + ([(b"content-security-policy", UI_POLICY)] if scope.get("path") == "/" else [])

        async def secured_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        if not is_public(scope):
            try:
                token = bearer_token(Headers(scope=scope).get("authorization", ""))
                principal = await run_in_threadpool(_authenticate, token)
            except ApiError as exc:
                await _answer(secured_send, scope, exc.status_code, {"detail": exc.detail, "code": exc.code},
                              exc.headers)
                return
            except (OperationalError, InterfaceError):  # keys live in the database: no database, no answer
                await _answer(secured_send, scope, 503, DB_UNAVAILABLE, {"Retry-After": "5"})
                return
            scope.setdefault("state", {})["principal"] = principal
        if scope.get("method") not in BODY_METHODS or _is_multipart(scope):
            await self.app(scope, receive, secured_send)
            return
        limit, setting = _body_limit(scope)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _answer(secured_send, scope, 413, _too_large(limit, setting))
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        tracked = TrackedSend(secured_send)
        try:
            await self.app(scope, capped_receive, tracked)
        except BodyTooLarge:
            if not tracked.started:
                await _answer(secured_send, scope, 413, _too_large(limit, setting))
