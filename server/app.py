"""The FastAPI application: ``create_app(settings, model=None)``.

The app holds a :class:`~server.inference.Registry` of servable models in ``app.state``:
the source model and every hosted prompt (``app.state.prompts``, a
:class:`~server.prompt_store.PromptStore`). The source is a frozen model (``model``, or loaded
from ``settings`` in a worker thread started by the lifespan: the server is live at once and
ready (``/v2/health/ready`` 200) when the model and the stored prompts are loaded) or any
:class:`~reprogram.oracles.Oracle` (``oracle``: ``reprogram serve`` proxies an API this way).
Hosted prompts query the source through one shared oracle: on a model, a ``LocalOracle`` over
the same model object with the server's output kind and 8-bit quantization. Every error is answered
as JSON ``{"error": "..."}`` with a 4xx status for bad input (413 for bodies over
``max_body_bytes``, checked from ``Content-Length`` before reading and while reading).

Middlewares, outermost first: :class:`~server.observability.ObservabilityMiddleware` (metrics,
access log), :class:`~server.gate.GateMiddleware` (API keys: 401 before any body is read),
:class:`~server.budget.TimeBudgetMiddleware` (body-read timeout, request deadline),
:class:`BodyLimitMiddleware`. ``app.state`` also holds the usage ``ledger`` (rate limits and
quotas), the ``metrics`` and ``draining`` (set on SIGTERM: readiness turns false).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reprogram.errors import ConfigError, ProtocolError, ReprogramError
from reprogram.oracles import LocalOracle, Oracle
from reprogram.zoo.loaders import load_repository, repository_names, source_name
from reprogram.zoo.registry import SourceModel, load_model
from server import routes_fits, routes_ops, routes_pictures, routes_prompts, routes_v1, routes_v2
from server.budget import TimeBudgetMiddleware
from server.console import install_console
from server.gate import GateMiddleware, KeyRing
from server.hosted import OracleServable, SharedOracle
from server.inference import ModelRunner, Registry, TooLarge
from server.jobs.redis_jobs import RedisJobs
from server.jobs.runner import JobRunner
from server.jobs.service import FitService
from server.jobs.store import JobStore
from server.limits import content_length
from server.observability import Metrics, ObservabilityMiddleware
from server.openapi import install_openapi
from server.prompt_store import PromptStore
from server.settings import Settings
from server.state import State, StateUnavailable, open_state

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one error shape: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def unauthorized(message: str) -> JSONResponse:
    """401 with ``WWW-Authenticate: Bearer``."""
    return error_response(401, message, headers={"WWW-Authenticate": 'Bearer realm="reprogram"'})


class BodyLimitMiddleware:
    """Reject request bodies over ``max_bytes`` (413) before and while they are read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = content_length(scope)
        except ProtocolError as exc:
            await error_response(400, str(exc), headers={"Connection": "close"})(
                scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            response = error_response(
                413,
                f"expected a body of at most {self.max_bytes} bytes (--max-body-bytes), got"
                f" Content-Length {declared}; send fewer images per request",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge(
                        f"expected a body of at most {self.max_bytes} bytes (--max-body-bytes),"
                        " got more; send fewer images per request"
                    )
            return message

        await self.app(scope, limited_receive, send)


def _status_of(exc: ReprogramError) -> int:
    status = getattr(exc, "status_code", 400)
    return status if isinstance(status, int) else 400


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to ``{"error": ...}``: 4xx for bad input, 500 otherwise; a client
    that disconnects mid-body is logged as 499, without a traceback."""

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "unhandled error on %s %s", request.method, request.url.path, exc_info=exc
        )
        return error_response(500, f"internal server error ({type(exc).__name__})")

    async def on_reprogram(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ReprogramError):
            return await on_unexpected(request, exc)
        status = _status_of(exc)
        logger.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        headers = getattr(exc, "headers", None)
        # an upstream's failure is told in our words: its own text can hold its tracebacks
        public = getattr(exc, "public_message", None)
        message = str(public) if isinstance(public, str) else str(exc)
        return error_response(status, message, headers if isinstance(headers, dict) else None)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):
            return await on_unexpected(request, exc)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        # the client went away mid-body: nobody reads an answer; 499 (nginx's "client closed
        # request") reaches the access log and metrics, and no traceback is written
        logger.info("%s %s -> %d: client disconnected before sending the whole body",
                    request.method, request.url.path, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RequestValidationError):
            parts = [
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
            ]
            return error_response(422, "invalid request: " + "; ".join(parts))
        return await on_unexpected(request, exc)

    app.add_exception_handler(ReprogramError, on_reprogram)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)


def _runner(settings: Settings, model: SourceModel, name: str) -> ModelRunner:
    """A runner with the model's own batch cap where its config sets one: forward passes of
    at most that many images, and requests of at most that many (the V2 max_batch_size), which
    also fit the body size and pixel limits, so a client that follows max_batch_size is never
    refused for size."""
    cap = model.meta.max_batch
    h, w = model.meta.input_size
    max_images = min(settings.max_images_per_request, cap or settings.max_images_per_request,
                     body_cap(settings, model.meta.input_size),
                     max(1, settings.max_request_pixels // (h * w)))  # --max-request-pixels
    return ModelRunner(
        model,
        output=settings.output,
        max_batch=min(settings.max_batch, cap or settings.max_batch),
        max_images=max_images,
        name=name,
        context_input=settings.context_input,
    )


def body_cap(settings: Settings, input_size: tuple[int, int]) -> int:
    """The most FP32 images of ``input_size`` a binary request body under the size limit
    holds: so that a client that chunks by the advertised cap is never refused (413)."""
    h, w = input_size
    return max(1, (settings.max_body_bytes - 1024) // (3 * h * w * 4))  # 1 KiB: the header


def served_name(settings: Settings) -> str:
    """The V2 name of the source model: ``--name``, else ``default``/``torchvision-ARCH``, or
    what a model path's config names (its folder's name by default)."""
    if settings.served_name:
        return settings.served_name
    if settings.model not in ("default",) and not settings.model.startswith("torchvision:"):
        return source_name(settings.model)
    return settings.model.replace("torchvision:", "torchvision-")


def source_names(settings: Settings) -> list[str]:
    """The names the configured source models will be served under (read before loading)."""
    if settings.model_repository:
        return repository_names(settings.model_repository)
    return [served_name(settings)]


def load_source(settings: Settings) -> SourceModel:
    """Load the configured source model (blocking)."""
    return load_model(settings.model, settings.weights, settings.class_names())


def load_sources(settings: Settings) -> list[tuple[str, SourceModel]]:
    """Every configured source model with its served name: the models of
    ``--model-repository`` (in name order), or the one ``--model``."""
    if settings.model_repository:
        return [(m.meta.name, m) for m in load_repository(settings.model_repository)]
    return [(served_name(settings), load_source(settings))]


def _load_stored(store: PromptStore) -> None:
    """Serve the stored prompts; with the shared state down, start without them (each is
    loaded when it is first asked for, once the state answers)."""
    try:
        store.load()
    except StateUnavailable as exc:
        logger.warning("stored prompts not loaded yet: %s", exc)


def _serve_models(registry: Registry, store: PromptStore, settings: Settings,
                  models: Sequence[tuple[str, SourceModel]]) -> None:
    """Serve the models and the stored prompts; hosted prompts run on the first model. The
    models are added last (they make us ready)."""
    first = models[0][1]
    oracle = LocalOracle(first, output=str(settings.output), quantize=True,
                         max_batch=settings.max_batch)
    store.attach(SharedOracle(oracle))
    _load_stored(store)
    for name, model in models:
        registry.add(_runner(settings, model, name))


def _serve_oracle(registry: Registry, store: PromptStore, settings: Settings,
                  oracle: Oracle) -> None:
    shared = SharedOracle(oracle)
    store.attach(shared)
    _load_stored(store)
    registry.add(OracleServable(shared, name=settings.served_name,
                                max_images=settings.max_images_per_request))


async def _load_in_background(app: FastAPI, settings: Settings, names: list[str]) -> None:
    registry: Registry = app.state.registry
    try:
        models = await asyncio.to_thread(load_sources, settings)
        await asyncio.to_thread(_serve_models, registry, app.state.prompts, settings, models)
        for name in set(names) - {n for n, _ in models}:  # a config renamed it meanwhile
            registry.forget(name)
        logger.info("models %s loaded; ready", [n for n, _ in models])
    except ReprogramError as exc:
        logger.error("cannot load models %s: %s", names, exc)
        for name in names:
            registry.mark_failed(name, str(exc))


def job_source(settings: Settings) -> dict[str, Any]:
    """What a tuning job's worker loads: the model hosted prompts run on (the first of a
    repository)."""
    if settings.model_repository:
        first = sorted(repository_names(settings.model_repository))[0]
        return {"model": str(Path(settings.model_repository) / first)}
    return {"model": settings.model, "weights": settings.weights,
            "class_names": settings.class_names()}


def _fit_service(settings: Settings, store: PromptStore, state: State) -> FitService | None:
    """The tuning-job service when ``--fit-workers`` > 0 (its runner starts with the app):
    jobs in ``--jobs-dir``, or in the shared Redis with ``--jobs-dir`` as scratch."""
    spec = settings.fits
    if not spec.enabled:
        return None
    directory = spec.directory or tempfile.mkdtemp(prefix="reprogram-jobs-")
    jobs = JobStore(directory) if state.client is None else RedisJobs(
        state.client, directory, where=state.backend)

    def register(data: bytes, owner: str | None, label: str) -> str:
        return store.add(data, owner=owner, label=label)[0].prompt_id

    runner = JobRunner(jobs, workers=spec.workers, source=job_source(settings),
                       threads=spec.threads, register=register, ready=lambda: store.ready)
    return FitService(spec, jobs, runner, is_vit=store.serves_vit)


def create_app(settings: Settings | None = None, model: SourceModel | None = None, *,
               oracle: Oracle | None = None,
               models: Sequence[tuple[str, SourceModel]] | None = None) -> FastAPI:
    """Build the app on a source: ``model`` (already loaded), ``models`` (``(name, model)``
    pairs, as :func:`load_sources` gives), ``oracle``, or none of them (the models in
    ``settings`` are loaded in the lifespan)."""
    settings = settings or Settings()
    if sum(x is not None for x in (model, oracle, models)) > 1:
        raise ConfigError("expected one source (a model, models or an oracle), got several")
    if model is not None:
        models = [(settings.served_name or model.meta.name, model)]
    if models is not None and not models:
        raise ConfigError("expected at least one source model, got none")
    registry = Registry()
    state = open_state(settings.state, prompts_dir=settings.prompts_dir,
                       images_per_minute=settings.images_per_minute,
                       quota_images=settings.quota_images)
    store = PromptStore(registry, state.records, max_bytes=settings.max_prompt_bytes,
                        max_images=settings.max_images_per_request,
                        max_pixels=settings.max_image_pixels)
    if oracle is not None and settings.fits.enabled:
        raise ConfigError("expected no --fit-workers in front of an API: tuning jobs need the"
                          " model's weights")
    fits = _fit_service(settings, store, state)
    pending: list[str] = []
    if models is not None:
        _serve_models(registry, store, settings, models)
    elif oracle is not None:
        _serve_oracle(registry, store, settings, oracle)
    else:
        pending = source_names(settings)
        for name in pending:
            registry.mark_loading(name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if pending:
            task = asyncio.create_task(_load_in_background(app, settings, pending))
        if fits is not None:
            fits.runner.start()
        yield
        app.state.draining = True
        if fits is not None:
            await asyncio.to_thread(fits.runner.stop)
        if task is not None and not task.done():
            task.cancel()

    app = FastAPI(
        title="reprogram",
        summary="A frozen image classifier over the Open Inference Protocol (KServe V2)",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.prompts = store
    app.state.fits = fits
    app.state.draining = False
    app.state.metrics = metrics = Metrics()
    app.state.shared = state
    app.state.ledger = state.ledger
    keyring = KeyRing(settings.api_keys)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TimeBudgetMiddleware, body_timeout=settings.body_timeout,
                       request_timeout=settings.request_timeout)
    app.add_middleware(GateMiddleware, keyring=keyring, unauthorized=unauthorized)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, fastapi_app=app,
                       access_log=settings.access_log)
    install_error_handlers(app)
    app.include_router(routes_v2.router)
    app.include_router(routes_v1.router)
    app.include_router(routes_prompts.router)
    app.include_router(routes_pictures.router)
    app.include_router(routes_fits.router)
    app.include_router(routes_ops.router)
    if settings.console:
        install_console(app)
    install_openapi(app, auth=keyring.enabled)
    return app

