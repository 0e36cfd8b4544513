"""``Location`` on every 201 Created and 202 Accepted: the URL of the resource the answer is about.

One rule for every route, present and future, instead of a line in each: the body of a 201/202 is the
resource (a small JSON object with its ``id``, or ``name`` for projects). If that id is already in the
request path (``POST /v1/jobs/{id}/cancel``) the resource is the path up to it; otherwise the request
created it in the collection it was posted to (``POST /v1/jobs`` -> ``/v1/jobs/{id}``). A route that sets
its own Location keeps it.
"""

import json
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOCATED = frozenset({201, 202})
# 201/202 bodies are single resources; anything larger is not one and passes through untouched.
MAX_BUFFER = 1024 * 1024


def resource_path(path: str, body: bytes) -> str | None:
    try:
        resource = json.loads(body)
    except ValueError:
        return None
    key = (resource.get("id") or resource.get("name")) if isinstance(resource, dict) else None
    if not isinstance(key, str) or not key:
        return None
    segments = path.rstrip("/").split("/")
    if key in segments:
        return "/".join(segments[:segments.index(key) + 1])
    return f"{path.rstrip('/')}/{quote(key, safe='')}"


class LocationMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def locating_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] in LOCATED and \
                    not any(name.lower() == b"location" for name, _ in message.get("headers", [])):
                start = message  # held until the body says which resource it is (unless the route said)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            body = b"".join(chunks)
            if message.get("more_body", False) and len(body) <= MAX_BUFFER:
                return
            located = None if message.get("more_body", False) else resource_path(scope.get("path", ""), body)
            if located is not None:
                start["headers"] = [*start.get("headers", []),
                                    (b"location", (scope.get("root_path", "") + located).encode())]
            await send(start)
            await send({**message, "body": body})
            start = None

        await self.app(scope, receive, locating_send)
