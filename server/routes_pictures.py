"""Pictures of hosted prompts: ``GET /v1/prompts/{id}/program.png`` (the program drawn as an
image) and ``POST /v1/prompts/{id}/render`` (one uploaded PNG/JPEG, multipart field ``files``,
as the source model receives it with the program applied). See :mod:`server.pictures`. Both
answer ``image/png``, follow the prompt routes' ownership (other keys: 404) and query no model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from server.admission import admission_for
from server.limits import PixelBudget
from server.openapi import errors
from server.pictures import program_png, rendered_png
from server.routes_prompts import IMAGES_FIELD, _multipart, _owner, read_files, store_of
from server.routes_v1 import decode_image

router = APIRouter(prefix="/v1/prompts", tags=["prompts"])

_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "a PNG image"}}
_NO_STORE = {"Cache-Control": "no-store"}


@router.get("/{prompt_id}/program.png", response_class=Response,
            responses={**_PNG, **errors(404)})
def program_picture(prompt_id: str, request: Request) -> Response:
    """The prompt's program as a PNG: its pixels (an additive program around grey), or VPT's
    tokens as a grey-scale matrix, one row per token."""
    servable = store_of(request).get(prompt_id, _owner(request))
    return Response(program_png(servable), media_type="image/png", headers=_NO_STORE)


@router.post("/{prompt_id}/render", response_class=Response,
             openapi_extra=_multipart(IMAGES_FIELD, many=False),
             responses={**_PNG, **errors(400, 403, 404, 408, 413, 415, 429, 503)})
async def render(prompt_id: str, request: Request) -> Response:
    """One uploaded image (multipart field ``files``) as the source model receives it: resized
    by the prompt's input transform, the program applied, at the model's input size."""
    admission_for(request).precheck()
    servable = store_of(request).get(prompt_id, _owner(request))
    files = await read_files(request, IMAGES_FIELD, max_files=1)
    settings = request.app.state.settings
    name, data = files[0]

    def work() -> bytes:
        image = decode_image(data, name, None, settings.max_image_pixels,
                             budget=PixelBudget(settings.max_request_pixels))
        return rendered_png(servable, image)

    return Response(await run_in_threadpool(work), media_type="image/png", headers=_NO_STORE)
