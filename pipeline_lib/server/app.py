"""The OpenAI-compatible speech server: a thin FastAPI layer over `BatchScheduler`.

`create_app(settings)` builds the ASGI app (`create_app()` reads `Settings.from_env()`; `Settings`
lives in pipeline_lib.server.settings), so tests, `soprano-onnx serve`,
`uvicorn --factory pipeline_lib.server.app:create_app` and gunicorn's UvicornWorker start the same thing. The app's lifespan loads the model (or takes `settings.tts`) and
starts the scheduler in the background: `GET /health` says 503 until it is ready, then 200; on
shutdown (uvicorn's graceful shutdown has let the responses in flight finish) it closes the
scheduler with drain=True.

Routes: `POST /v1/audio/speech` (OpenAI's request; audio streamed as generated, or OpenAI's
server-sent events with stream_format "sse"), `GET /v1/models`, `GET /v1/models/{id}`,
`GET /v1/audio/voices`, `GET /v1/server/info`, `GET /health`, `GET /metrics` (Prometheus), the
web page: `GET /` and `/static/...` from `pipeline_lib/server/static/`, `GET /openapi.json`
(server.openapi: what the server really sends) and `GET /docs` (Swagger UI from the installed
swagger-ui-bundle-v2 wheel; no /docs without it). Every GET route answers HEAD, every response
carries x-request-id, and SIGTERM's drain refuses new requests (server.middleware).

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for bad input (request
validation included, never 422; a body without a JSON Content-Type or that cannot be parsed says so
with its own code), 401 for a missing or wrong bearer token on /v1 when an api_key is
set, 404, 413 for a body over max_body_bytes (from Content-Length, or counted while reading), 429
with Retry-After when the scheduler's queue is full, 503 (with Retry-After) while loading or
shutting down. A client that disconnects cancels its job: the response watches for the ASGI
`http.disconnect` message while it waits for audio, and sending into a closed connection counts too.
A job that fails after the response has started ends the connection without the closing chunk (so
the client sees an incomplete response), or with an `error` event for SSE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.scheduler import (
    BatchScheduler,
    QueueFullError,
    SchedulerClosedError,
)
from pipeline_lib.audio.encode import FORMATS, open_stream
from pipeline_lib.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from pipeline_lib.server.openapi import build as build_openapi
from pipeline_lib.server.responses import JobResponse, audio_stream, sse_stream
from pipeline_lib.server.middleware import RETRY_AFTER_S, ApiError, Guard, shutting_down
from pipeline_lib.server.settings import Settings
from pipeline_lib.server.schemas import (
    GUARD_FIELDS,
    MODEL_ALIASES,
    MODEL_ID,
    SAMPLING_FIELDS,
    SpeechBody,
    model_list,
    model_object,
    voice_list,
)

__all__ = ["create_app", "STATIC_DIR"]

log = logging.getLogger("pipeline_lib.server")

STATIC_DIR = Path(__file__).with_name("static")


def _precision(config: Path | None, model: Path) -> str:
    """fp32 / int8 from the conversion record in the model's config (pipeline_lib.convert writes
    it), else a folder name on the path (artifacts/<backend>/<precision>/...); an export without a
    conversion record is the fp32 export; "unknown" when there is nothing to go by."""
    from pipeline_lib.bench import PRECISIONS

    cfg: dict[str, Any] | None = None
    if config is not None and config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = None
    conversion = None
    if isinstance(cfg, dict):
        conversion = cfg.get("conversion") or (cfg.get("onnx") or {}).get("conversion")
        if isinstance(conversion, dict) and conversion.get("precision") in PRECISIONS:
            return str(conversion["precision"])
    for part in reversed(model.parent.parts):
        if part in PRECISIONS:
            return part
    return "fp32" if isinstance(cfg, dict) and conversion is None else "unknown"


def _load_tts(s: Settings) -> Any:
    """SopranoTTS.from_dir without the stateful OpenVINO LM (stateful=False): the batching
    scheduler needs the step model that takes the KV cache as inputs. Construction warms up."""
    from pipeline_lib.runtime.tts import SopranoTTS

    kwargs: dict[str, Any] = {"backend": s.backend} if s.precision is None else {"precision": s.precision,
                                                                                  "objective": "batch"}
    if s.threads is not None:
        kwargs["num_threads"] = s.threads
    # static_decode_width: OpenVINO's fixed-shape one-row model serves only single-row steps at one
    # width, which the batch's cache rarely has; it would hold a second copy of the weights.
    return SopranoTTS.from_dir(Path(s.model), stateful=False, static_decode_width=None, **kwargs)  # type: ignore[arg-type]


def _refusal(exc: QueueFullError | SchedulerClosedError) -> ApiError:
    """The answer to a request the scheduler cannot take: 429 with Retry-After (queue full), or 503 (closing)."""
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    return ApiError(503, str(exc), type="server_error", code="shutting_down")


def _sampling_defaults(max_new_tokens: int) -> dict[str, float | int]:
    """The runtime's sampling defaults (SamplingParams) and this server's max_new_tokens default, for the page."""
    from dataclasses import asdict

    from pipeline_lib.runtime.sampling import DEFAULTS

    return {**asdict(DEFAULTS), "max_new_tokens": max_new_tokens}


def _decoder_config(decoder: Path) -> Path | None:
    own = decoder.with_name(decoder.stem + "_istft_config.json")
    return own if own.is_file() else next(iter(sorted(decoder.parent.glob("*_istft_config.json"))), None)


class _Service:
    """The app's state: settings, metrics, and once loaded the tts and its scheduler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(self._queue_depth)
        self.status = "loading"  # loading -> ready -> draining; or failed
        self.error: str | None = None
        self.tts: Any = None
        self.scheduler: BatchScheduler | None = None
        self.info: dict[str, Any] = {}
        self.created = int(time.time())

    def _queue_depth(self) -> float:
        return float(self.scheduler.queue_depth) if self.scheduler is not None else 0.0

    def load(self) -> None:
        """Load the model (unless given) and start the scheduler; runs in a worker thread."""
        s = self.settings
        t0 = time.perf_counter()
        try:
            tts = s.tts if s.tts is not None else _load_tts(s)
            limits = {k: getattr(s, k) for k in ("max_batch", "max_queue") if getattr(s, k) is not None}
            scheduler = BatchScheduler(tts, observer=self.metrics, max_unread_s=s.max_unread_s,
                                       read_timeout_s=s.read_timeout_s, holdback=s.holdback, **limits).start()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log; serve stops
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", self.error)
            if s.on_load_error is not None:
                s.on_load_error(exc)
            return
        self.tts, self.scheduler = tts, scheduler
        lm_path, decoder_path = Path(tts.lm_path), Path(tts.decoder_path)
        self.info = {
            "backend": tts.backend,
            "decoder_backend": getattr(tts, "decoder_backend", tts.backend),
            "models": tts.choice.label if getattr(tts, "choice", None) is not None else None,
            "lm_precision": _precision(getattr(tts.spec, "path", None), lm_path),
            "decoder_precision": _precision(_decoder_config(decoder_path), decoder_path),
            "threads": tts.num_threads,
            "sample_rate": tts.sample_rate,
            "max_batch": scheduler.max_batch,
            "max_queue": scheduler.max_queue,
            "model": MODEL_ID,
            "model_dir": str(s.model if s.model is not None else lm_path.parent),
            "formats": list(FORMATS),
            "max_input_chars": s.max_input_chars,
            "max_new_tokens": s.max_new_tokens,
            "sampling_defaults": _sampling_defaults(s.max_new_tokens),
            "hallucination_guard": s.hallucination_guard,
            "hallucination_retries": s.hallucination_retries,
            "holdback": s.holdback,
        }
        if self.status == "loading":
            self.status = "ready"
        log.info("model ready in %.1f s: %s", time.perf_counter() - t0, self.info)

    def begin_draining(self) -> None:
        """Take no new speech requests (the server is stopping); those in flight go on."""
        if self.status in ("loading", "ready"):
            self.status = "draining"

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close(drain=True)

    def ready(self) -> BatchScheduler:
        if self.status == "ready" and self.scheduler is not None:
            return self.scheduler
        if self.status == "failed":
            raise ApiError(503, f"the model failed to load ({self.error}); fix the model folder and restart the server",
                           type="server_error", code="model_load_failed")
        if self.status == "draining":
            raise shutting_down()
        raise ApiError(503, "the model is still loading: retry when GET /health returns 200", type="server_error",
                       code="loading", headers={"Retry-After": str(RETRY_AFTER_S)})


def _param_of(message: str) -> str:
    """The request field an InputError is about: the runtime names a sampling setting first; text
    errors ("text is empty", ...) are about `input`."""
    word = message.split(" ", 1)[0]
    return word if word in SAMPLING_FIELDS + GUARD_FIELDS else "input"


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_error(exc: RequestValidationError, content_type: str | None) -> ApiError:
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err.get("msg"))
        return ApiError(400, f"the request body is not valid JSON ({detail}): send a JSON object", code="invalid_json")
    if kind == "missing" and param is None:
        return ApiError(400, "the request body is empty: send a JSON object with the speech parameters "
                        "(model, input, voice)", code="missing_required_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required parameter: {param!r}", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param!r}", param=param, code="unknown_parameter")
    if param is None and not _is_json(content_type):
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return ApiError(400, f"the request body was sent with {sent}: send the JSON object with the header "
                        "`Content-Type: application/json` (curl: -H 'Content-Type: application/json')",
                        code="invalid_content_type")
    if param is None:
        return ApiError(400, f"the request body must be a JSON object with the speech parameters ({err.get('msg')})",
                        code="invalid_type")
    if param == "input" and kind == "string_too_short":
        return ApiError(400, "input is empty: give the text to speak (1 to max_input_chars characters)",
                        param="input", code="invalid_value")
    if kind == "value_error":
        msg = str((err.get("ctx") or {}).get("error", err.get("msg")))
    else:
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, (int, float, bool)) or (isinstance(got, str) and len(got) <= 40) else ""
        msg = f"{param}: {err.get('msg')}{shown}"
    return ApiError(400, msg, param=param, code="invalid_type" if kind.endswith("_type") else "invalid_value")


_STATUS_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app (see the module docstring); `settings` None: `Settings.from_env()`."""
    settings = settings if settings is not None else Settings.from_env()
    service = _Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(asyncio.to_thread(service.load))
        try:
            yield
        finally:
            service.begin_draining()
            await loading
            await asyncio.to_thread(service.close)

    app = FastAPI(title="Soprano TTS", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible speech API (POST /v1/audio/speech) over the Soprano TTS model.")
    app.state.service = service
    app.add_middleware(Guard, service=service)
    docs = swagger_ui_dir()
    routes_doc = "GET /docs" if docs is not None else "GET /openapi.json"

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, max_input_chars=settings.max_input_chars,
                                               max_new_tokens=settings.max_new_tokens, api_key=bool(settings.api_key))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc, request.headers.get("content-type")).response()

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return ApiError(400, str(exc), param=_param_of(str(exc)), code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see {routes_doc} for this server's routes"
        elif exc.status_code == 405:  # the method the client sent (HEAD runs as GET: server.middleware)
            message = f"{request.scope.get('state', {}).get('method', request.method)} is not allowed on {request.url.path}"
        elif exc.status_code == 400:  # FastAPI's "error parsing the body": not UTF-8, or nested too deep
            message = ("the request body could not be parsed as JSON (not UTF-8, or nested too deeply): "
                       "send a UTF-8 JSON object of the speech parameters")
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed",
                413: "request_too_large"}.get(exc.status_code)
        return ApiError(exc.status_code, message, type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                        code=code, headers=getattr(exc, "headers", None)).response()

    @app.post("/v1/audio/speech", response_model=None)
    async def speech(body: SpeechBody) -> Response:
        """OpenAI's speech endpoint; the audio streams as it is generated (chunked transfer)."""
        scheduler = service.ready()
        if len(body.input) > settings.max_input_chars:
            raise ApiError(400, f"input is {len(body.input)} characters long; the limit is {settings.max_input_chars} "
                           "(max_input_chars): split the text into several requests", param="input",
                           code="string_above_max_length")
        try:  # queue room first: a refusal costs no text preparation (429 in milliseconds)
            scheduler.check_room()
        except (QueueFullError, SchedulerClosedError) as exc:
            raise _refusal(exc) from None
        if body.max_new_tokens is not None and body.max_new_tokens > settings.max_new_tokens:
            raise ApiError(400, f"max_new_tokens {body.max_new_tokens} is above this server's limit of "
                           f"{settings.max_new_tokens} tokens per sentence: ask for fewer or leave it out",
                           param="max_new_tokens", code="invalid_value")
        tts = service.tts
        try:
            encoder = open_stream(body.response_format, tts.sample_rate, body.sample_rate)
        except InputError as exc:
            raise ApiError(400, str(exc), param="sample_rate", code="invalid_value") from None
        try:
            guard = {"hallucination_guard": settings.hallucination_guard,
                     "hallucination_retries": settings.hallucination_retries}
            job = await run_in_threadpool(scheduler.submit, body.speech_request(settings.max_new_tokens, guard))
        except BaseException as exc:
            encoder.close()
            if isinstance(exc, InputError):
                raise ApiError(400, str(exc), param=_param_of(str(exc)), code="invalid_value") from None
            if isinstance(exc, (QueueFullError, SchedulerClosedError)):
                raise _refusal(exc) from None
            raise
        headers = {"X-Sample-Rate": str(encoder.out_rate), "X-Audio-Format": body.response_format,
                   "Cache-Control": "no-store"}
        if body.stream_format == "sse":
            headers["X-Accel-Buffering"] = "no"
            return JobResponse(job, sse_stream(job, encoder, tts), service, media_type="text/event-stream",
                                headers=headers)
        return JobResponse(job, audio_stream(job, encoder), service, media_type=encoder.format.content_type,
                            headers=headers)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(service.created)

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in (MODEL_ID, *MODEL_ALIASES):
            raise ApiError(404, f"the model {model_id!r} does not exist: GET /v1/models lists this server's models",
                           param="model", code="model_not_found")
        return model_object(model_id, service.created)

    @app.get("/v1/audio/voices")
    async def voices() -> dict[str, Any]:
        return voice_list()

    @app.get("/v1/server/info")
    async def server_info() -> dict[str, Any]:
        """backend, lm_precision, decoder_precision (fp32 | int8 | unknown), threads, sample_rate
        (the model's), max_batch, max_queue, model, and a few more for the web page."""
        service.ready()
        return service.info

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok" if service.status == "ready" else service.status}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, 200 if service.status == "ready" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, f"{page} is missing: the web page is not installed", code="not_found")
        return FileResponse(page)

    if docs is not None:

        @app.get("/docs", include_in_schema=False)
        async def swagger_ui() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API",
                                       swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs/assets/swagger-ui.css",
                                       swagger_favicon_url="/docs/assets/favicon-32x32.png")

        app.mount("/docs/assets", StaticFiles(directory=docs), name="docs-assets")
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def swagger_ui_dir() -> Path | None:
    """Swagger UI's files from the installed `swagger-ui-bundle-v2` wheel (the serve extra), so /docs
    works offline; None without it (then there is no /docs, and 404s point to /openapi.json)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None
