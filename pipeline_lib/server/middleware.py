"""What every HTTP request of the speech server goes through before and after its route.

`ApiError` is an error response in OpenAI's shape. `Guard` is a pure ASGI middleware (it never
buffers a streamed response) that, in this order:

- gives the request an id: the client's `x-request-id` when it is 1 to 200 visible ASCII
  characters, else a new `req_<32 hex digits>`; every response carries it as `x-request-id`, and
  the access log line (logger `pipeline_lib.server.access`, one per request, when the response has
  ended) names it;
- answers HEAD on every GET route: the route runs as GET, the headers go out, the body does not;
- refuses new requests with 503 `shutting_down` (and `Connection: close`) while the server drains
  after SIGTERM, except `GET /health` (which then answers 503 itself) and `GET /metrics`;
- checks the bearer token on /v1 when an api_key is set (before the body is read): 401;
- bounds the request body (Content-Length, then counted while reading): 413;
- counts responses by route and status for /metrics;
- turns an exception that escapes a route before its response started into a 500 in OpenAI's shape
  (code `internal_error`, logged with the request id), so that it too carries x-request-id.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from typing import Any, Mapping

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline_lib.server.schemas import error_body

__all__ = ["ApiError", "Guard", "REQUEST_ID_HEADER", "too_large", "shutting_down"]

access_log = logging.getLogger("pipeline_lib.server.access")
log = logging.getLogger("pipeline_lib.server")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,200}")
RETRY_AFTER_S = 5
# Routes that still answer while the server drains: readiness (it says 503 itself) and metrics.
_OPEN_WHILE_DRAINING = ("/health", "/metrics")


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=self.headers)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {limit} bytes (max_body_bytes): shorten the input",
                    code="request_too_large")


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down: send the request to another instance or retry later",
                    type="server_error", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


def request_id(headers: Mapping[bytes, bytes]) -> str:
    """The client's x-request-id if it is 1 to 200 visible ASCII characters, else a new one."""
    given = headers.get(REQUEST_ID_HEADER.encode())
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given.decode("ascii")
    return f"req_{uuid.uuid4().hex}"


class Guard:
    """See the module docstring; `service` is the app's state (settings, status, metrics)."""

    def __init__(self, app: ASGIApp, service: Any) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        rid = request_id(headers)
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        state = scope.setdefault("state", {})
        state["request_id"], state["method"] = rid, "HEAD" if head else scope["method"]
        status = 500
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), rid.encode("ascii"))]}
            elif head and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        try:
            refusal = self._refuse(scope, headers)
            if refusal is not None:
                await refusal.response()(scope, receive, guarded_send)
            else:
                try:
                    await self.app(scope, self._bounded(receive), guarded_send)
                except Exception:  # noqa: BLE001 - a bug: answered as a 500 with the request id, and logged
                    if started:
                        raise  # the status is sent: the server ends the connection
                    log.exception("request %s %s failed (request_id=%s)", scope["method"], scope.get("path", ""), rid)
                    await ApiError(500, f"internal server error (request id {rid}): the server's log names the cause",
                                   type="server_error", code="internal_error").response()(scope, receive, guarded_send)
        finally:
            route = scope.get("route")
            self.service.metrics.request_done(getattr(route, "path", "unmatched"), status)
            client = scope.get("client")
            access_log.info('%s "%s %s HTTP/%s" %d request_id=%s %.3fs',
                            f"{client[0]}:{client[1]}" if client else "-", "HEAD" if head else scope["method"],
                            scope.get("path", ""), scope.get("http_version", "1.1"), status, rid,
                            time.perf_counter() - t0)

    def _refuse(self, scope: Scope, headers: Mapping[bytes, bytes]) -> ApiError | None:
        s = self.service.settings
        path = scope.get("path", "")
        if self.service.status == "draining" and path not in _OPEN_WHILE_DRAINING:
            return shutting_down()
        if s.api_key and path.startswith("/v1/"):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not auth:
                return ApiError(401, "no API key: send the header 'Authorization: Bearer <key>' (the server's --api-key)",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), s.api_key.encode("utf-8")):
                return ApiError(401, "incorrect API key: send 'Authorization: Bearer <key>' with the server's --api-key",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return ApiError(400, f"Content-Length {length.decode('latin-1')!r} is not a number", code="invalid_header")
            if n > s.max_body_bytes:
                return too_large(s.max_body_bytes)
        return None

    def _bounded(self, receive: Receive) -> Receive:
        limit = self.service.settings.max_body_bytes
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large(limit).message)
            return message

        return bounded_receive
