"""Native, human-friendly routes: model info and prediction on uploaded PNG/JPEG files.

Each upload is decoded with Pillow (PNG or JPEG only), its header checked against the pixel
caps (per image, and for all of a request's images together) before the pixels are decoded
(decompression bombs), converted to RGB and resized to the
model's input size with bilinear filtering. Scores follow the operator's output kind: the
``score`` is a probability (``probs``/``topk:K``), a logit (``logits``) or ``None``
(``label``, which returns only the predicted label). Prediction charges one image per file
to the caller's rate limit and quota (:mod:`server.admission`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from reprogram.errors import ProtocolError
from reprogram.zoo.modelconfig import resize_image
from server.admission import admission_for, lookup
from server.budget import check_deadline
from server.inference import Registry, Servable, TooLarge, UnsupportedMedia
from server.limits import PixelBudget
from server.openapi import errors
from server.settings import OutputKind

if TYPE_CHECKING:
    from server.zero_shot import ZeroShotQuery

router = APIRouter(prefix="/v1", tags=["v1"])

FORMATS = ("PNG", "JPEG")
FIELD = "files"
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")

_PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": [FIELD],
                }
            }
        },
    }
}


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


@router.get("/models", responses=errors())
def list_models(request: Request) -> dict[str, list[str]]:
    """Names of the served source models (hosted prompts are listed at ``/v1/prompts``)."""
    store = getattr(request.app.state, "prompts", None)
    prompts = {p.name for p in store.list()} if store is not None else set()
    return {"models": [n for n in _registry(request).names() if n not in prompts]}


@router.get("/models/{model_name}", responses=errors(404, 503))
def model_info(model_name: str, request: Request) -> dict[str, Any]:
    """Class names, input size, output kind, preprocessing and limits of one model."""
    return lookup(request, model_name).info()


PREDICT_ERRORS = errors(400, 403, 404, 408, 413, 415, 422, 429, 503)


@router.post("/models/{model_name}/predict", openapi_extra=_PREDICT_OPENAPI,
             responses=PREDICT_ERRORS)
async def predict(
    model_name: str,
    request: Request,
    top_k: int = Query(5, ge=1, le=1000, description="labels to return per image"),
) -> dict[str, Any]:
    """Classify uploaded images (multipart field ``files``, repeated)."""
    admission = admission_for(request)
    admission.precheck()
    servable = lookup(request, model_name)
    settings = request.app.state.settings
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise ProtocolError(
            f"expected a multipart/form-data upload with field {FIELD!r}, got content type"
            f" {request.headers.get('content-type')!r}"
        )
    from server.zero_shot import MAX_LABELS

    async with request.form(max_files=servable.max_images,
                            max_fields=servable.max_images + MAX_LABELS + 1) as form:
        query = _form_labels(servable, form)
        uploads = form.getlist(FIELD)
        if not uploads:
            raise ProtocolError(
                f"expected one or more files in multipart field {FIELD!r}, got none"
            )
        files: list[tuple[str, bytes]] = []
        for item in uploads:
            if not isinstance(item, UploadFile):
                raise ProtocolError(f"expected file uploads in field {FIELD!r}, got a text value")
            files.append((item.filename or "", await item.read()))
    return await run_in_threadpool(
        admission.run, len(files), _predict, servable, files, top_k, settings.max_image_pixels,
        PixelBudget(settings.max_request_pixels), query
    )


def _form_labels(servable: Servable, form: Any) -> ZeroShotQuery | None:
    """A zero-shot model's candidate ``labels`` (repeated text fields) and ``template``."""
    from server.zero_shot import (
        LABELS,
        ZeroShotQuery,
        check_request_labels,
        parse_template,
        serves_labels,
    )

    values = form.getlist(LABELS)
    template = form.get("template")
    if not values:
        if template is not None:
            raise ProtocolError(f"expected {LABELS!r} fields with the 'template' field")
        return None
    if not serves_labels(servable):
        raise ProtocolError(f"expected no {LABELS!r}: model {servable.name!r} classifies among"
                            " its own classes (only a zero-shot model takes candidate labels)")
    if not all(isinstance(v, str) for v in values) or not (template is None
                                                          or isinstance(template, str)):
        raise ProtocolError(f"expected text values in {LABELS!r} and 'template', got a file")
    return ZeroShotQuery(check_request_labels(values), parse_template({"template": template}))


def _predict(
    servable: Servable, files: list[tuple[str, bytes]], top_k: int, max_pixels: int,
    budget: PixelBudget | None = None, query: ZeroShotQuery | None = None,
) -> dict[str, Any]:
    policy = getattr(servable, "resize_policy", ("stretch", None))  # source models have one
    batch = np.stack([decode_image(data, name, servable.input_size, max_pixels, policy, budget)
                      for name, data in files])
    if query is None:
        scores, names = servable.infer(batch), servable.class_names
    else:
        scores = servable.infer_labels(batch, query)  # type: ignore[attr-defined]
        names = query.labels
    tops = top_entries(scores, top_k, names, servable.output)
    return {
        "model": servable.name,
        "output_kind": str(servable.output),
        "predictions": [
            {"filename": name, "top": top} for (name, _), top in zip(files, tops, strict=True)
        ],
    }


def decode_image(
    data: bytes, filename: str, size: tuple[int, int] | None, max_pixels: int,
    policy: tuple[str, int | None] = ("stretch", None), budget: PixelBudget | None = None,
) -> np.ndarray:
    """Decode a PNG/JPEG upload into uint8 ``[3, H, W]`` at ``size`` (None: its own size),
    fitted by ``policy`` (``stretch``, ``crop`` or ``letterbox`` with the crop's resize size;
    see :func:`reprogram.zoo.modelconfig.resize_image`); its pixels are charged to the
    request's ``budget`` (from its header) before decoding."""
    check_deadline("while decoding the uploads")
    label = repr(filename) if filename else "upload"
    if not data:
        raise ProtocolError(f"expected a PNG or JPEG image in {label}, got an empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as exc:
        if data.startswith(MAGIC):  # claims to be PNG/JPEG: broken, not unsupported
            raise _broken(label, exc) from None
        raise UnsupportedMedia(
            f"expected a PNG or JPEG image in {label}, got an unrecognised file"
        ) from None
    except Image.DecompressionBombError:
        raise TooLarge(f"expected an image of at most {max_pixels} pixels in {label}") from None
    except Exception as exc:  # untrusted bytes: any decoder failure is the client's
        raise _broken(label, exc) from None
    if img.width * img.height > max_pixels:
        raise TooLarge(
            f"expected at most {max_pixels} pixels in {label} (--max-image-pixels), got"
            f" {img.width}x{img.height}"
        )
    if budget is not None:
        budget.take(img.width * img.height, f"{label} ({img.width}x{img.height})")
    try:
        img.load()
        rgb = img.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise _broken(label, exc) from None
    if size is not None:
        rgb = resize_image(rgb, size, policy[0], policy[1])
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def _broken(label: str, exc: Exception) -> ProtocolError:
    return ProtocolError(
        f"expected a decodable PNG or JPEG image in {label}, got a broken or truncated file"
        f" ({type(exc).__name__}: {exc})"
    )


def top_entries(
    scores: np.ndarray, k: int, class_names: Sequence[str], output: OutputKind
) -> list[list[dict[str, Any]]]:
    """Per image, the best ``k`` classes as ``{"label", "index", "score"}`` (``/v1`` shape).

    Label-only servers give one entry with ``score`` None; ``topk:K`` servers never list more
    than ``K`` entries; ``logits`` servers report logits as scores.
    """
    if output.kind == "label":
        return [
            [{"label": class_names[int(i)], "index": int(i), "score": None}] for i in scores
        ]
    k = min(k, scores.shape[1], output.k or scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [
        [
            {"label": class_names[int(j)], "index": int(j), "score": float(row_scores[j])}
            for j in row
        ]
        for row, row_scores in zip(order, scores, strict=True)
    ]
