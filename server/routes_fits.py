"""``/v1/fits``: tuning jobs, white-box fits run by the server for its users.

``POST /v1/fits`` takes a data set and a fit config, either as multipart (field ``data``: a
zip or tar of an ImageFolder, field ``config``: a JSON object of fit settings) or as JSON
(``{"config": {...}, "images": V2 UINT8 tensor [N, C, H, W], "labels": [...],
"class_names": [...]}``), and answers 202 with the job (``Location: /v1/fits/{id}``).
``GET /v1/fits`` lists the caller's jobs, ``GET /v1/fits/{id}`` shows one (state, progress,
validation accuracy so far, the learning curve, the error in words, the hosted prompt's id
once it succeeded), ``DELETE /v1/fits/{id}`` cancels it, ``GET /v1/fits/{id}/events`` streams
its changes as Server-Sent Events (``event: job``, ending with ``event: end``) and
``GET /v1/fits/{id}/prompt`` downloads the learned artifact when the server allows it
(``--allow-prompt-download``). A key sees and cancels only its own jobs (others: 404).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from reprogram.errors import ProtocolError
from server.gate import caller_of
from server.jobs.service import FitService, JobsOff, job_config
from server.limits import check_json_structure
from server.openapi import errors
from server.prompt_store import Forbidden

router = APIRouter(prefix="/v1/fits", tags=["tuning jobs"])

DATA_FIELD = "data"
CONFIG_FIELD = "config"
EVENT_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0


class FitProgress(BaseModel):
    """How far a job has come: steps, image evaluations against the budget, a fraction."""

    model_config = ConfigDict(extra="allow")

    step: int
    steps: int | None
    images: int
    budget: int | None
    fraction: float | None


class FitJob(BaseModel):
    """A tuning job as the API shows it (more fields may follow)."""

    model_config = ConfigDict(extra="allow")

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: FitProgress
    val_accuracy: float | None
    curve: list[dict[str, Any]]
    error: str | None
    prompt: str | None


class FitList(BaseModel):
    """``GET /v1/fits``: the caller's jobs, oldest first."""

    fits: list[FitJob]


def service_of(request: Request) -> FitService:
    service: FitService | None = getattr(request.app.state, "fits", None)
    if service is None:
        raise JobsOff("this server runs no tuning jobs; its operator can start it with"
                      " --fit-workers N")
    return service


def _owner(request: Request) -> str | None:
    return caller_of(request).owner


_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [DATA_FIELD, CONFIG_FIELD],
                                       "properties": {
                                           DATA_FIELD: {"type": "string", "format": "binary"},
                                           CONFIG_FIELD: {"type": "string"}}}},
    "application/json": {"schema": {"type": "object",
                                    "required": ["config", "images", "labels", "class_names"]}},
}}}


async def _multipart(request: Request, service: FitService) -> tuple[object, bytes]:
    async with request.form(max_files=1, max_fields=2) as form:
        config = form.get(CONFIG_FIELD)
        upload = form.get(DATA_FIELD)
        if not isinstance(config, str):
            raise ProtocolError(f"expected the fit config as JSON text in multipart field"
                                f" {CONFIG_FIELD!r}")
        if not isinstance(upload, UploadFile):
            raise ProtocolError(f"expected a zip or tar archive in multipart field"
                                f" {DATA_FIELD!r}")
        data = await upload.read()
    try:
        return json.loads(config), data
    except ValueError as exc:
        raise ProtocolError(f"expected JSON in multipart field {CONFIG_FIELD!r}: {exc}"
                            ) from None


@router.post("", status_code=202, openapi_extra=_BODY, response_model=FitJob,
             responses={202: {"model": FitJob, "description": "queued (Location: the job)"},
                        **errors(400, 403, 413, 422, 429)})
async def submit(request: Request) -> JSONResponse:
    """Queue a white-box fit of the served model on the caller's data set."""
    service = service_of(request)
    owner = _owner(request)
    content_type = request.headers.get("content-type", "")
    if "multipart/form-data" in content_type:
        raw, data = await _multipart(request, service)
        cfg = job_config(raw)
        service.admit(owner, cfg)
        job = await run_in_threadpool(service.submit_archive, owner, cfg, data)
    elif "application/json" in content_type:
        settings = request.app.state.settings
        body = await request.body()
        check_json_structure(body, max_depth=settings.max_json_depth,
                             max_elements=settings.max_json_elements)
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"expected a JSON body: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("expected a JSON object {config, images, labels, class_names}")
        cfg = job_config(obj.get("config"))
        service.admit(owner, cfg)
        job = await run_in_threadpool(service.submit_tensors, owner, cfg, obj)
    else:
        raise ProtocolError(f"expected multipart/form-data (fields {DATA_FIELD!r},"
                            f" {CONFIG_FIELD!r}) or application/json, got {content_type!r}")
    return JSONResponse(service.view(job), status_code=202,
                        headers={"Location": f"/v1/fits/{job.id}"})


@router.get("", response_model=FitList, responses=errors(403))
def list_jobs(request: Request) -> dict[str, list[dict[str, Any]]]:
    """The caller's tuning jobs, oldest first."""
    service = service_of(request)
    return {"fits": [service.view(j) for j in service.store.list(_owner(request))]}


@router.get("/{job_id}", response_model=FitJob, responses=errors(403, 404))
def show(job_id: str, request: Request) -> dict[str, Any]:
    """One job: state, progress, validation accuracy so far, learning curve, error, prompt."""
    service = service_of(request)
    return service.view(service.store.get(job_id, _owner(request)))


@router.delete("/{job_id}", response_model=FitJob, responses=errors(403, 404, 409))
def cancel(job_id: str, request: Request) -> dict[str, Any]:
    """Cancel a queued or running job (a running one stops at its next step)."""
    service = service_of(request)
    return service.view(service.runner.cancel(job_id, _owner(request)))


@router.get("/{job_id}/prompt", responses=errors(403, 404, 409))
def download(job_id: str, request: Request) -> Response:
    """The learned artifact, when the server allows downloads (``--allow-prompt-download``)."""
    service = service_of(request)
    job = service.store.get(job_id, _owner(request))
    if not service.spec.allow_download:
        raise Forbidden("this server hosts learned prompts without handing them out; use the"
                        f" hosted prompt {job.prompt_id or '(once the job succeeds)'}")
    if job.state != "succeeded":
        from server.jobs.runner import JobConflict

        raise JobConflict(f"tuning job {job_id!r} is {job.state}; its prompt exists once it"
                          " has succeeded")
    data = service.store.prompt_bytes(job_id)
    return Response(data, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{job_id}.safetensors"'})


@router.get("/{job_id}/events", responses=errors(403, 404))
async def events(job_id: str, request: Request) -> StreamingResponse:
    """Server-Sent Events: ``event: job`` with the job's view at each change, then
    ``event: end`` when it has ended."""
    service = service_of(request)
    owner = _owner(request)
    service.store.get(job_id, owner)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = None
        quiet = 0.0
        while True:
            view = service.view(service.store.get(job_id, owner))
            text = json.dumps(view)
            if text != last:
                last, quiet = text, 0.0
                yield f"event: job\ndata: {text}\n\n"
            if view["state"] in ("succeeded", "failed", "cancelled"):
                yield f"event: end\ndata: {json.dumps({'state': view['state']})}\n\n"
                return
            if quiet >= HEARTBEAT_SECONDS:
                quiet = 0.0
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_SECONDS)
            quiet += EVENT_SECONDS

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
