"""Cheap structural caps on V2 JSON bodies, checked before ``json.loads`` builds anything.

A JSON body nested thousands of levels deep would make the decoder (and every recursive walk
after it) recurse towards a stack overflow, and a body of millions of tiny numbers costs far
more memory as Python objects than as bytes. :func:`check_json_structure` bounds both in a few
passes over the bytes at C speed: strings are blanked with one regular expression, everything
but brackets is deleted with ``bytes.translate``, the nesting depth is the running maximum of
the bracket balance (computed with numpy in bounded chunks), and the element count is bounded
above by the number of commas plus one. Over either cap: 413 with the cap in the message.
"""

from __future__ import annotations

import re

import numpy as np

from server.inference import TooLarge

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20


def json_depth(data: bytes) -> int:
    """The maximal nesting depth of brackets in ``data`` (strings must be blanked first)."""
    brackets = data.translate(None, _NOT_BRACKETS)
    depth, best = 0, 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_CHUNK, len(brackets) - start),
                              offset=start)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int64)
        running = np.cumsum(steps) + depth
        best = max(best, int(running.max()))
        depth = int(running[-1])
    return best


def check_json_structure(head: bytes, *, max_depth: int, max_elements: int) -> None:
    """Raise :class:`TooLarge` (413) if JSON ``head`` nests deeper than ``max_depth`` or may
    hold more than ``max_elements`` values."""
    blanked = _STRING.sub(b'""', head) if b'"' in head else head
    depth = json_depth(blanked)
    if depth > max_depth:
        raise TooLarge(f"expected JSON nested at most {max_depth} levels deep, got {depth}")
    elements = blanked.count(b",") + 1
    if elements > max_elements:
        raise TooLarge(
            f"expected at most {max_elements} JSON values in a request, got about {elements};"
            " send large batches as binary tensors (Inference-Header-Content-Length) or split"
            " them")
