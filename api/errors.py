"""Every error a client sees is an RFC 9457 problem (``application/problem+json``): ``detail`` (a sentence) and
``code`` (machine-readable) as always, plus ``type``, ``title``, ``status`` and ``instance`` (the request id, as
in ``X-Request-ID`` and the logs). Under ``/v2`` (Open Inference Protocol) it also carries ``error``, the one
field KServe/Triton clients read."""

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "validation_error", 429: "too_many_requests", 503: "unavailable",
                507: "insufficient_storage"}


DB_UNAVAILABLE = {"detail": "the database is unavailable; try again shortly", "code": "db_unavailable"}
PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[FieldError] | None = None
    error: str | None = None  # under /v2 only: the detail again, where Open Inference Protocol clients look


# Documented on every route so clients (and the schema fuzzer) know the shape of each error; the media type
# is switched to application/problem+json in the schema by ``document_problems``.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 507)
}


def problem(status: int, code: str, detail: str, *, path: str = "", **extra: Any) -> dict[str, Any]:
    """The error body for ``status``; ``path`` is the request's (OIP clients under /v2 read ``error``)."""
    # Imported here: api.observability imports api.auth, which imports this module.
    from api.observability import request_id_var

    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"type": f"urn:tuneserve:error:{code}", "title": title, "status": status, "detail": detail,
            "code": code, "instance": request_id_var.get(), **extra}
    if path == "/v2" or path.startswith("/v2/"):
        body["error"] = detail
    return body


def problem_response(request: Request, status: int, code: str, detail: str,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(problem(status, code, detail, path=request.url.path, **extra), status_code=status,
                        headers=headers, media_type=PROBLEM_JSON)


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Error responses in the OpenAPI schema under the media type they are sent with."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, answer in operation.get("responses", {}).items():
                content = answer.get("content", {})
                if status[:1] in "45" and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    return schema


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.headers = headers


def not_found(kind: str, item_id: str) -> ApiError:
    shown = item_id if item_id.isprintable() and len(item_id) <= 64 else repr(item_id[:64])
    return ApiError(404, f"{kind}_not_found", f"{kind} {shown} does not exist")


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_detail(errors: Sequence[Any]) -> str:
    return "; ".join(f"{_field(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors)


def install_error_handlers(app: FastAPI) -> None:
    schema = app.openapi
    app.openapi = lambda: document_problems(schema())  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem_response(request, exc.status_code, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "")} for e in exc.errors()]
        return problem_response(request, 422, "validation_error", _validation_detail(exc.errors()), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return problem_response(request, exc.status_code, STATUS_CODES.get(exc.status_code, "error"), detail,
                                getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db(request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return problem_response(request, 503, DB_UNAVAILABLE["code"], DB_UNAVAILABLE["detail"], {"Retry-After": "5"})


class TrackedSend:
    """``send``, remembering whether the response has started: from then on no other answer can be sent."""

    def __init__(self, send: Send) -> None:
        self.send, self.started = send, False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class InternalErrorMiddleware:
    """An exception no handler took becomes a 500 problem naming the request id, and its traceback is logged
    under that id. (Starlette's own last resort sits outside the request-id middleware and answers plain text.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if tracked.started:  # too late for another answer: the server closes the connection
                raise
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            body = problem(500, "internal_error", "the server failed to answer this request; the error is logged "
                           "under this request's id (instance)", path=scope.get("path", ""))
            payload = JSONResponse(body, status_code=500, media_type=PROBLEM_JSON)
            await payload(scope, receive, send)
