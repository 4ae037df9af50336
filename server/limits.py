"""Per-request caps checked before the work they bound is done.

- :func:`content_length`: the declared body size, ASCII digits only.
- :func:`check_json_structure`: nesting depth and value count of a V2 JSON body, measured by
  :func:`reprogram.strict.json_structure` in one linear pass before ``json.loads`` builds
  anything (a body nested thousands of levels deep would make the decoder and every walk after
  it recurse; a body of millions of tiny numbers costs far more as Python objects than as
  bytes). Over either cap: 413.
- :class:`PixelBudget`: the decoded pixels of one request, all images together
  (``--max-request-pixels``), taken image by image from the image headers before the pixels
  are decoded. Over it: 413.
- :func:`check_distinct_outputs`: a V2 request names each output at most once (400).
- :func:`check_response_size`: the encoded answer fits ``--max-response-bytes`` (413); a
  bound that is certain before the model runs is checked first by
  :func:`response_floor`.

Each refusal names the limit, its value and how to stay under it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from starlette.types import Scope

from reprogram.errors import ProtocolError
from reprogram.strict import json_structure, parse_count
from server.inference import TooLarge


def content_length(scope: Scope) -> int | None:
    """The request's ``Content-Length`` (ASCII digits only; 400 otherwise), None when absent."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    return None if declared is None else parse_count(declared, "Content-Length")


def check_json_structure(head: bytes, *, max_depth: int, max_elements: int) -> None:
    """Raise :class:`TooLarge` (413) if JSON ``head`` nests deeper than ``max_depth`` or may
    hold more than ``max_elements`` values."""
    depth, elements = json_structure(head, max_depth=max_depth, max_values=max_elements)
    if depth > max_depth:
        raise TooLarge(f"expected JSON nested at most {max_depth} levels deep"
                       f" (--max-json-depth), got {depth}")
    if elements > max_elements:
        raise TooLarge(
            f"expected at most {max_elements} JSON values in a request (--max-json-elements),"
            f" got more than {max_elements}; send large batches as binary tensors"
            " (Inference-Header-Content-Length) or split them")


class PixelBudget:
    """The decoded pixels one request may still use (``--max-request-pixels``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, pixels: int, what: str) -> None:
        """Charge ``pixels`` for ``what``; :class:`TooLarge` when the request goes over."""
        if self.used + pixels > self.limit:
            raise TooLarge(
                f"expected at most {self.limit} decoded pixels per request"
                f" (--max-request-pixels), got {self.used + pixels} with {what}; send fewer or"
                " smaller images per request")
        self.used += pixels


def check_distinct_outputs(names: Iterable[str]) -> None:
    """400 when a V2 request asks for the same output more than once."""
    repeated = {n: c for n, c in Counter(names).items() if c > 1}
    if repeated:
        name, count = next(iter(repeated.items()))
        raise ProtocolError(f"expected each requested output once, got {name!r} {count} times;"
                            " list every output at most once")


def response_floor(images: int, classes: int, binary: bool) -> int:
    """Bytes the scores of ``images x classes`` take at the least (4 per value as binary FP32,
    2 per value as JSON: one digit and a comma)."""
    return images * classes * (4 if binary else 2)


def check_response_size(size: int, limit: int, *, before: bool = False) -> None:
    """413 when an answer of ``size`` bytes (``before``: at least that many) exceeds ``limit``."""
    if size > limit:
        got = f"at least {size}" if before else str(size)
        raise TooLarge(
            f"expected an answer of at most {limit} bytes (--max-response-bytes), this request's"
            f" would be {got}; ask for fewer images per request, or for binary outputs"
            " (binary_data_output)")
