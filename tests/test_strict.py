"""The strict wire parsers: header numbers, tensor shapes and bounded JSON (``reprogram.strict``).

Unit cases for each hostile form seen in the wild (a superscript two, other scripts' digits,
zero-size shapes with huge dimensions, deep nesting, escape runs that made the old string
scan quadratic), then properties under hypothesis: the number parser agrees with ``int`` on
ASCII digits and refuses everything else with :class:`ProtocolError`; the header-length and
Content-Length parsers never raise anything else; the JSON depth is exact for every valid
JSON text, whatever the chunking.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fuzz_support import fuzz, json_values
from hypothesis import strategies as st

from reprogram import protocol
from reprogram.errors import ArtifactError, ProtocolError
from reprogram.strict import (
    MAX_DIMENSION,
    MAX_RANK,
    check_shape,
    json_structure,
    loads_bounded,
    parse_count,
)
from server.limits import content_length


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


def test_parse_count_takes_ascii_digits_only() -> None:
    assert parse_count(" 42\t", "n") == 42 and parse_count(b"007", "n") == 7
    assert parse_count("9" * 19, "n") == int("9" * 19)
    for bad in ("\u00b2", "1\u00b2", "\u0661\u0662", "\uff11", "1_000", "+1", "-1", "1.0", "",
                " ", "0x10", "1e3", "9" * 20, "１"):
        with pytest.raises(ProtocolError, match="ASCII digits"):
            parse_count(bad, "n")
    with pytest.raises(ProtocolError, match="between 1 and 10, got 11"):
        parse_count("11", "n", minimum=1, maximum=10)


def test_header_length_and_content_length() -> None:
    assert protocol.parse_header_length({"inference-header-content-length": "5"}, 9) == 5
    for value in ("\u00b2", "0", "10", "-1", "5 5"):
        with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
            protocol.parse_header_length({"Inference-Header-Content-Length": value}, 9)
    with pytest.raises(ProtocolError, match="got none"):
        protocol.parse_header_length({"Inference-Header-Content-Length": "1"}, 0)
    assert content_length({"headers": [(b"content-length", b"12")]}) == 12
    assert content_length({"headers": []}) is None
    with pytest.raises(ProtocolError, match="Content-Length"):
        content_length({"headers": [(b"content-length", b"\xb2")]})


def test_check_shape() -> None:
    assert check_shape([2, 3, 32, 32]) == (2, 3, 32, 32)
    assert check_shape([0, 3, 32, 32]) == (0, 3, 32, 32)  # empty, and allowed here
    assert check_shape([]) == ()
    for bad, why in (([2**63, 0, 32, 32], "0..2147483647"), ([-1, 3], "0..2147483647"),
                     ([True, 3], "integer dimensions"), ([1.0], "integer dimensions"),
                     ("123", "list of integers"), ([1] * (MAX_RANK + 1), "at most 16"),
                     ([MAX_DIMENSION, 0, MAX_DIMENSION], "multiply to at most")):
        with pytest.raises(ProtocolError, match=why):
            check_shape(bad)


def test_json_structure_cases() -> None:
    cases: list[Any] = [[], {}, [[[]]], "x", 1, [1, 2, 3], {"a": ["]]]", "\\", '\\"[', {"b": [
        1, {"c": "{"}]}]}, ["\\\\\\\\\"" * 5, [[["a"]]]]]
    for value in cases:
        text = json.dumps(value).encode()
        for chunk in (1, 2, 7, 1 << 20):
            assert json_structure(text, chunk=chunk)[0] == depth_of(value), (text, chunk)
    assert json_structure(b"[1, 2, 3]") == (1, 3)
    assert json_structure(b'["a,b", "c"]') == (1, 2)  # commas inside strings do not count
    assert json_structure(b"[" * 100 + b"]" * 100, max_depth=10)[0] > 10  # stops early


def test_json_structure_is_linear_on_escape_runs() -> None:
    # a quote followed by escaped quotes made the old regular-expression scan quadratic: 160 kB
    # took minutes; 4 MB must now take well under a second (5 s leaves room for a busy machine)
    start = time.perf_counter()
    for body in (b'"' + b'\\"' * 2_000_000, b'"' * 4_000_000, b'"[' * 2_000_000):
        json_structure(body, max_depth=32, max_values=1 << 22)
    assert time.perf_counter() - start < 5.0


def test_loads_bounded() -> None:
    assert loads_bounded(b'{"a": [1]}', "x", max_bytes=100, max_depth=2) == {"a": [1]}
    with pytest.raises(ArtifactError, match="nested at most 2 levels deep, got 3"):
        loads_bounded("[[[]]]", "the header", max_bytes=100, max_depth=2, error=ArtifactError)
    with pytest.raises(ProtocolError, match="at most 5 bytes"):
        loads_bounded(b"[1, 2, 3]", "x", max_bytes=5, max_depth=2)
    with pytest.raises(ProtocolError, match="at most 2 values"):
        loads_bounded(b"[1, 2, 3]", "x", max_bytes=100, max_depth=2, max_values=2)
    with pytest.raises(ProtocolError, match="valid JSON"):
        loads_bounded(b"[1, 2", "x", max_bytes=100, max_depth=2)


# ----------------------------------------------------------------------------------------------
# properties

_TEXT = st.one_of(
    st.text(max_size=24),
    st.text(alphabet="0123456789", min_size=1, max_size=24),
    st.text(alphabet="0123456789 \t\u00b2\u00b3\u0661\u0966\uff11_+-.eE", max_size=12),
    st.integers(min_value=0, max_value=2**80).map(str),
)


def test_fuzz_number_parser(extended_run: bool) -> None:
    def check(text: str) -> None:
        digits = text.strip(" \t")
        ok = bool(digits) and digits.isascii() and digits.isdigit() and len(digits) <= 19
        try:
            value = parse_count(text, "n")
        except ProtocolError:
            assert not ok
        else:
            assert ok and value == int(digits)

    fuzz(_TEXT, check, extended=extended_run)


def test_fuzz_header_parsers(extended_run: bool) -> None:
    def check(case: tuple[str, int, bytes]) -> None:
        text, size, raw = case
        try:
            n = protocol.parse_header_length({"Inference-Header-Content-Length": text}, size)
        except ProtocolError:
            pass
        else:
            assert n is not None and 1 <= n <= size
        try:
            declared = content_length({"headers": [(b"content-length", raw)]})
        except ProtocolError:
            declared = None
        digits = raw.strip(b" \t")
        valid = bool(digits) and digits.isdigit() and len(digits) <= 19  # bytes: ASCII only
        assert declared == (int(digits) if valid else None)

    fuzz(st.tuples(_TEXT, st.integers(min_value=0, max_value=2**40), st.binary(max_size=24)),
         check, extended=extended_run)


def test_fuzz_json_depth_is_exact(extended_run: bool) -> None:
    def check(case: tuple[Any, int, bool]) -> None:
        value, chunk, ascii_only = case
        try:
            text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        except ValueError:
            return
        depth, values = json_structure(text, chunk=chunk)
        assert depth == depth_of(value) and values >= 1
        loads_bounded(text, "x", max_bytes=len(text), max_depth=depth)  # never over its own

    fuzz(st.tuples(json_values(), st.integers(min_value=1, max_value=64), st.booleans()),
         check, extended=extended_run)
