"""``/v1/prompts``: upload, list, describe, delete and apply learned prompts.

``POST /v1/prompts`` takes a prompt artifact in multipart field ``file`` (201 when new, 200
with the same id when the file is already hosted); ``POST /v1/prompts/{id}/predict`` takes
PNG/JPEG images in multipart field ``files`` (repeatable) and returns, per image, the target
label, its probability and the ``top_k`` target classes. Each image keeps its own size: the
prompt's input transform resizes it, exactly as ``reprogram eval`` and ``reprogram apply`` do.
Hosted prompts are also V2 models named by their id (see ``routes_v2``). With API keys, each
prompt belongs to the keys that uploaded it (:mod:`server.prompt_store`): other keys get 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from reprogram.errors import ProtocolError
from server.admission import admission_for
from server.gate import caller_of
from server.hosted import PROBS, PromptServable
from server.inference import TooLarge
from server.limits import PixelBudget, content_length
from server.openapi import errors
from server.prompt_store import PromptStore
from server.routes_v1 import decode_image, top_entries

router = APIRouter(prefix="/v1/prompts", tags=["prompts"])

UPLOAD_FIELD = "file"
IMAGES_FIELD = "files"
MULTIPART_SLACK = 64 * 1024  # multipart framing around the prompt file


def _multipart(field: str, many: bool) -> dict[str, Any]:
    item = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": item} if many else item
    schema = {"type": "object", "properties": {field: prop}, "required": [field]}
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": schema}}}}


def store_of(request: Request) -> PromptStore:
    """The app's prompt store."""
    store: PromptStore = request.app.state.prompts
    return store


def _require_multipart(request: Request, field: str) -> None:
    content_type = request.headers.get("content-type", "")
    if "multipart/form-data" not in content_type:
        raise ProtocolError(f"expected a multipart/form-data upload with field {field!r}, got"
                            f" content type {content_type!r}")


async def read_files(request: Request, field: str, max_files: int,
                     max_bytes: int | None = None) -> list[tuple[str, bytes]]:
    """The files in multipart ``field`` as ``(filename, bytes)``; 400 if there are none."""
    _require_multipart(request, field)
    async with request.form(max_files=max_files, max_fields=max_files) as form:
        uploads = form.getlist(field)
        if not uploads:
            raise ProtocolError(f"expected one or more files in multipart field {field!r},"
                                " got none")
        files: list[tuple[str, bytes]] = []
        for item in uploads:
            if not isinstance(item, UploadFile):
                raise ProtocolError(f"expected file uploads in field {field!r}, got a text value")
            data = await item.read(-1 if max_bytes is None else max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                raise TooLarge(f"expected a prompt file of at most {max_bytes} bytes, got more")
            files.append((item.filename or "", data))
    return files


def _owner(request: Request) -> str | None:
    return caller_of(request).owner


class PromptSummary(BaseModel):
    """What the prompt routes return about a prompt (more fields may follow)."""

    model_config = ConfigDict(extra="allow")

    id: str
    sha256: str
    target_classes: list[str]
    num_classes: int
    v2_model: str


class PromptList(BaseModel):
    """``GET /v1/prompts``."""

    prompts: list[PromptSummary]


class Deleted(BaseModel):
    """``DELETE /v1/prompts/{prompt_id}``."""

    deleted: str


_UPLOADED = {"model": PromptSummary, "description": "hosted (201: new for this key)"}


@router.post("", status_code=201, openapi_extra=_multipart(UPLOAD_FIELD, many=False),
             response_model=PromptSummary,
             responses={200: {**_UPLOADED, "description": "already hosted for this key"},
                        **errors(400, 408, 409, 413, 422, 503, 507)})
async def upload(request: Request) -> JSONResponse:
    """Host a prompt artifact (multipart field ``file``); its id is its content hash."""
    store = store_of(request)
    declared = content_length(request.scope)
    if declared is not None and declared > store.max_bytes + MULTIPART_SLACK:
        raise TooLarge(f"expected a prompt file of at most {store.max_bytes} bytes, got a body"
                       f" of {declared} bytes")
    files = await read_files(request, UPLOAD_FIELD, max_files=1, max_bytes=store.max_bytes)
    name, data = files[0]
    servable, created = await run_in_threadpool(store.add, data, label=repr(name or "upload"),
                                                owner=_owner(request))
    return JSONResponse(servable.summary(), status_code=201 if created else 200)


@router.get("", response_model=PromptList, responses=errors())
def list_prompts(request: Request) -> dict[str, list[dict[str, Any]]]:
    """Every hosted prompt the caller may see, with its metadata."""
    return {"prompts": [s.summary() for s in store_of(request).list(_owner(request))]}


@router.get("/{prompt_id}", response_model=PromptSummary, responses=errors(404))
def describe(prompt_id: str, request: Request) -> dict[str, Any]:
    """Target classes, program and label-map kinds, accuracies, source model, created time."""
    return store_of(request).get(prompt_id, _owner(request)).summary()


@router.delete("/{prompt_id}", response_model=Deleted, responses=errors(403, 404, 507))
def delete(prompt_id: str, request: Request) -> dict[str, str]:
    """Stop hosting a prompt for the caller; its file is removed when no key owns it."""
    store_of(request).delete(prompt_id, _owner(request))
    return {"deleted": prompt_id}


@router.post("/{prompt_id}/predict", openapi_extra=_multipart(IMAGES_FIELD, many=True),
             responses=errors(400, 403, 404, 408, 413, 415, 422, 429, 503))
async def predict(
    prompt_id: str,
    request: Request,
    top_k: int = Query(5, ge=1, le=1000, description="target classes to return per image"),
) -> dict[str, Any]:
    """Classify uploaded PNG/JPEG images (multipart field ``files``, repeated) with a prompt."""
    admission = admission_for(request)
    admission.precheck()
    servable = store_of(request).get(prompt_id, _owner(request))
    caller_of(request).model = servable.name
    files = await read_files(request, IMAGES_FIELD, max_files=servable.max_images)
    settings = request.app.state.settings
    return await run_in_threadpool(admission.run, len(files), _predict, servable, files, top_k,
                                   settings.max_image_pixels,
                                   PixelBudget(settings.max_request_pixels))


def _predict(servable: PromptServable, files: list[tuple[str, bytes]], top_k: int,
             max_pixels: int, budget: PixelBudget | None = None) -> dict[str, Any]:
    images = [decode_image(data, name, None, max_pixels, budget=budget) for name, data in files]
    probs = servable.predict_images(images)
    tops = top_entries(probs, top_k, servable.class_names, PROBS)
    return {
        "prompt": servable.prompt_id,
        "predictions": [
            {"filename": name, "label": top[0]["label"], "index": top[0]["index"],
             "score": top[0]["score"], "top": top}
            for (name, _), top in zip(files, tops, strict=True)
        ],
    }
