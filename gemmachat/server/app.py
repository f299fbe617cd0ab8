"""The HTTP app: the Gatekeeper every request passes first (the access log line, other web pages
refused, the API key, the body limit), errors answered in OpenAI's shape, and create_app, which puts
the routes together."""

from __future__ import annotations

import hmac
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message as AsgiMessage, Receive, Scope, Send

from gemmachat import __version__, openai_api as api
from gemmachat.engine import EngineClosed
from gemmachat.errors import PromptTooLong, one_line
from gemmachat.server import (conversations_routes, embeddings_routes, ollama_routes, openai_routes,
                              operations_routes, page_routes, same_origin)
from gemmachat.server.core import ServerCore
from gemmachat.server.responses import shutting_down
from gemmachat.server.slots import ClientGone

# The longest URL path (with its query) an access log line shows.
PATH_LOG_LIMIT = 1000


class Gatekeeper:
    """Outermost layer: the access log line, other web pages refused, the API key, and the request
    body limit."""

    def __init__(self, app: ASGIApp, core: ServerCore) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_note)
        except Exception as error:  # noqa: BLE001 - a bug in one request must not reach uvicorn's log
            # Here, not in an app exception handler: Starlette runs that one outside this layer and
            # then re-raises, so the access line said 499 and uvicorn logged a whole traceback.
            # Once the server is stopping, what it takes away under a request (its worker threads)
            # is why the request failed: a 503, as for the requests it refuses.
            closing = self.core.closing
            self.core.log(f"gemma-chat: {scope['method']} {scope['path']} "
                          f"{'was cut by the shutdown' if closing else 'failed'}: {type(error).__name__}: {error}")
            if status == 0:
                await _error(send_and_note, scope, shutting_down() if closing else
                             api.ApiError(500, f"internal error: {type(error).__name__}"))
        finally:
            self._log(scope, status, time.perf_counter() - started)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        core = self.core
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        server = scope.get("server")
        refused = same_origin.refusal(headers, server[0] if server else None, core.settings.host,
                                      core.settings.allow_origins)
        if refused is not None:
            await _drain(receive, 1 << 20)
            await _error(send, scope, refused)
            return
        if (origin := same_origin.cors_origin(headers, core.settings.allow_origins)) is not None:
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await _preflight(send, origin, headers.get("access-control-request-headers"))
                return
            send = _with_cors(send, origin)
        if core.api_key and scope["path"] != "/health" and not page_routes.is_page(scope["path"]):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), core.api_key.encode()):
                await _drain(receive, 1 << 20)
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
                await _error(send, scope, api.ApiError(401, message, code="invalid_api_key"),
                             {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdecimal():
                await _error(send, scope, api.ApiError(400, "invalid Content-Length"))
                return
            if int(length) > core.max_body:
                await _drain(receive, 4 * core.max_body)
                await _error(send, scope, _too_large(core.max_body))
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            # The body is JSON whatever the client calls it, as with llama.cpp: `curl -d` says
            # application/x-www-form-urlencoded, and FastAPI would not parse that.
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                scope["headers"] = [(name, value) for name, value in scope["headers"]
                                    if name.lower() != b"content-type"] + [(b"content-type", b"application/json")]
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > core.max_body:
                    if more:
                        await _drain(receive, 4 * core.max_body)
                    await _error(send, scope, _too_large(core.max_body))
                    return
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as error:  # FastAPI said only "There was an error parsing the body"
                await _error(send, scope, api.ApiError(
                    400, f"the request body is not UTF-8, as JSON must be (byte 0x{body[error.start]:02x} at "
                    f"offset {error.start})", code="invalid_json"))
                return
            # Every string a client sends is text we can answer with: no lone surrogates.
            receive = _replay(api.replace_lone_surrogates(bytes(body)), receive)
        await self.app(scope, receive, send)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        client = scope.get("client")
        who = client[0] if client else "-"
        query = scope.get("query_string", b"")
        path = one_line(scope["path"] + ("?" + query.decode("latin-1") if query else ""), PATH_LOG_LIMIT)
        line = f'{who} "{scope["method"]} {path}" {status or 499} {seconds:.2f}s'
        detail = scope.get("gemma.log")
        if detail:
            line += f" {detail}"
        error = scope.get("gemma.error")
        if error and self.core.verbose:
            line += f" ({error})"
        try:
            self.core.log(line)
        except Exception:  # noqa: BLE001 - a broken log sink must not break the server
            pass


def _too_large(limit: int) -> api.ApiError:
    return api.ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                        code="request_too_large")


async def _drain(receive: Receive, limit: int) -> None:
    """Read (and drop) the rest of a request body, so the client sees our answer, not a reset."""
    total = 0
    while total <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> AsgiMessage:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


def _error_response(scope: Scope, error: api.ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error object, or on Ollama's paths Ollama's {"error": "..."}: its clients take the
    message from there (the `ollama` package showed a whole dict as the message)."""
    scope["gemma.error"] = error.message
    body = {"error": error.message} if scope["path"].startswith("/api/") else error.body()
    return JSONResponse(body, status_code=error.status, headers=headers)


def _with_cors(send: Send, origin: str) -> Send:
    """`send`, its answers readable by the page at `origin` (errors too: a page can then say why)."""

    async def send_with_cors(message: AsgiMessage) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *_cors_headers(origin)]}
        await send(message)

    return send_with_cors


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


async def _preflight(send: Send, origin: str, asked_headers: str | None) -> None:
    """A browser's question before a request a page may not send unasked (JSON, an API key): yes.
    It needs no API key, as browsers send it without one."""
    headers = [*_cors_headers(origin), (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, PATCH, DELETE"),
               (b"access-control-max-age", b"600"), (b"content-length", b"0")]
    if asked_headers:
        headers.append((b"access-control-allow-headers", asked_headers.encode("latin-1")))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _error(send: Send, scope: Scope, error: api.ApiError, headers: dict[str, str] | None = None) -> None:
    response = _error_response(scope, error, headers)

    async def no_receive() -> AsgiMessage:
        return {"type": "http.disconnect"}

    await response(scope, no_receive, send)


def create_app(core: ServerCore) -> FastAPI:
    app = FastAPI(
        title="gemma-chat",
        version=__version__,
        description="An OpenAI-compatible API for a local Gemma model on llama.cpp.",
        redoc_url=None,
    )
    app.state.core = core

    def error_response(request: Request, error: api.ApiError) -> JSONResponse:
        return _error_response(request.scope, error)

    @app.exception_handler(api.ApiError)
    async def on_api_error(request: Request, error: api.ApiError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, api.validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
            code = "not_found"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(error.detail), None
        response = error_response(request, api.ApiError(error.status_code, message, code=code))
        for name, value in (error.headers or {}).items():
            response.headers[name] = value
        return response

    # Text over the context, found while tokenizing it (a prompt, messages, /tokenize).
    @app.exception_handler(PromptTooLong)
    async def on_too_long(request: Request, error: PromptTooLong) -> JSONResponse:
        return error_response(request, core.too_long(str(error)))

    @app.exception_handler(EngineClosed)
    async def on_closed(request: Request, error: EngineClosed) -> JSONResponse:
        return error_response(request, shutting_down())

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, error: ClientGone) -> Response:
        request.scope.setdefault("gemma.log", "client went away while waiting")  # unless noted at work
        return Response(status_code=499)

    openai_routes.add_routes(app, core)
    ollama_routes.add_routes(app, core)
    operations_routes.add_routes(app, core)
    embeddings_routes.add_routes(app, core)
    conversations_routes.add_routes(app, core)
    page_routes.add_routes(app, core)

    app.add_middleware(Gatekeeper, core=core)
    return app
