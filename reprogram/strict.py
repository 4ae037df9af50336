"""Strict parsers for what arrives from the wire: header numbers, tensor shapes, bounded JSON.

Everything a client (or a file) can choose goes through one of these before it becomes a
Python number, a numpy shape or a parsed JSON object, so a hostile value fails here with an
"expected X, got Y" error and never deeper (in ``int()``, ``numpy.reshape`` or a recursive
decoder):

- :func:`parse_count`: a non-negative integer written in ASCII digits only. ``str.isdigit``
  also accepts superscripts and other scripts' digits, which ``int()`` then refuses or reads
  as something else, so it is not used on wire text.
- :func:`check_shape`: a tensor shape, at most :data:`MAX_RANK` dimensions, each an ``int``
  (not a ``bool``) in ``0..MAX_DIMENSION``, whose non-zero dimensions multiply to at most
  :data:`MAX_ELEMENTS`. A zero dimension is allowed and makes an empty tensor; the server
  refuses an empty image batch with its own 400.
- :func:`json_structure` and :func:`loads_bounded`: the nesting depth and the number of
  values of a JSON text, measured in one linear pass at numpy speed (strings, with their
  escapes, are skipped), and ``json.loads`` only when both are under their caps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from reprogram.errors import ProtocolError, ReprogramError

MAX_DIGITS = 19
"""Longest decimal accepted by :func:`parse_count` (every such value fits in 64 bits)."""
MAX_RANK = 16
MAX_DIMENSION = 2**31 - 1
MAX_ELEMENTS = 2**40
"""Caps of :func:`check_shape`: far above any real tensor, far below numpy's own limits."""

CHUNK = 1 << 20
"""Bytes :func:`json_structure` looks at in one step."""
_QUOTE = ord('"')
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{},')


def parse_count(text: str | bytes, what: str, *, minimum: int = 0,
                maximum: int | None = None) -> int:
    """``text`` (surrounding spaces and tabs allowed) as an integer of ASCII digits only, in
    ``minimum..maximum``; :class:`~reprogram.errors.ProtocolError` otherwise."""
    raw = text.decode("latin-1") if isinstance(text, bytes | bytearray) else str(text)
    digits = raw.strip(" \t")
    if not digits or len(digits) > MAX_DIGITS or not (digits.isascii() and digits.isdigit()):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise ProtocolError(f"expected {what} as a decimal integer of ASCII digits 0-9,"
                            f" got {shown!r}")
    value = int(digits)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ProtocolError(f"expected {what} {bound}, got {value}")
    return value


def check_shape(shape: object, what: str = "tensor") -> tuple[int, ...]:
    """A validated tensor shape as a tuple (see the module docstring for the rule)."""
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise ProtocolError(f"expected the shape of {what} as a list of integers, got"
                            f" {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise ProtocolError(f"expected the shape of {what} to have at most {MAX_RANK}"
                            f" dimensions, got {len(shape)}")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int | np.integer):
            raise ProtocolError(f"expected integer dimensions in the shape of {what}, got"
                                f" {d!r}")
        if not 0 <= d <= MAX_DIMENSION:
            raise ProtocolError(f"expected dimensions in 0..{MAX_DIMENSION} in the shape of"
                                f" {what}, got {int(d)}")
        dims.append(int(d))
    volume = math.prod(d for d in dims if d)
    if volume > MAX_ELEMENTS:
        raise ProtocolError(f"expected the non-zero dimensions of {what} to multiply to at most"
                            f" {MAX_ELEMENTS}, got {dims}")
    return tuple(dims)


def json_structure(data: bytes, *, max_depth: int | None = None,
                   max_values: int | None = None, chunk: int = CHUNK) -> tuple[int, int]:
    """``(depth, values)`` of JSON ``data``: the deepest bracket nesting and the number of
    commas plus one, both counted outside strings (each comma separates two values); the
    count stops early once it is past ``max_depth`` or ``max_values``.

    Exact for valid JSON; for invalid JSON some pair of numbers (the parser then refuses it).
    Escapes are removed first (``\\\\`` pairs, then ``\\"``, as a JSON parser pairs them), so
    every quote left opens or closes a string, and a bracket is outside strings when an even
    number of quotes precedes it. Linear time and bounded memory: ``chunk`` bytes at a time,
    each reduced to its quotes, brackets and commas with ``bytes.translate``.
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = best = values = quotes = 0
    for start in range(0, len(data), chunk):
        kept = np.frombuffer(data[start : start + chunk].translate(None, _NOT_MARKS), np.uint8)
        if not len(kept):
            continue
        quote = kept == _QUOTE
        if not quote.any() and quotes % 2:
            continue  # all inside one string
        if quote.any():
            inside = (np.cumsum(quote, dtype=np.uint8) + quotes % 2) % 2 == 1
            quotes += int(np.count_nonzero(quote))
            kept = kept[~quote & ~inside]
        opens = (kept == _OPEN[0]) | (kept == _OPEN[1])
        closes = (kept == _CLOSE[0]) | (kept == _CLOSE[1])
        if len(kept):
            running = np.cumsum(opens, dtype=np.int64) - np.cumsum(closes, dtype=np.int64)
            best = max(best, depth + int(running.max()))
            depth += int(running[-1])
        values += len(kept) - int(np.count_nonzero(opens | closes))
        if (max_depth is not None and best > max_depth) or (
                max_values is not None and values + 1 > max_values):
            break
    return best, values + 1


def loads_bounded(data: bytes | str, what: str, *, max_bytes: int, max_depth: int,
                  max_values: int | None = None,
                  error: type[ReprogramError] = ProtocolError) -> Any:
    """``json.loads(data)`` once its size, depth and value count are under the caps;
    ``error`` (with an "expected X, got Y" message) for those and for malformed JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"expected {what} of at most {max_bytes} bytes, got {len(raw)}")
    depth, values = json_structure(raw, max_depth=max_depth, max_values=max_values)
    if depth > max_depth:
        raise error(f"expected {what} nested at most {max_depth} levels deep, got {depth}")
    if max_values is not None and values > max_values:
        raise error(f"expected at most {max_values} values in {what}, got about {values}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise error(f"expected {what} to be valid JSON, got {type(exc).__name__}: {exc}"
                    ) from None
