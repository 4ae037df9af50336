"""A Markdown file's marked shell blocks and the output they must print (``readme_runner``
runs them).

The convention (the README's development section says the same):

- ``<!-- readme-test -->`` on the line right before a fenced ``bash`` block: the block runs.
  Every such block runs in one ``bash`` shell, in the order written, so variables, files and
  background jobs carry over from one block to the next; the shell has ``set -Eeuo pipefail``.
  Options follow the word, separated by spaces: ``http-errors`` lets a ``curl`` answer of
  4xx/5xx pass (otherwise it fails the block, as if curl had ``--fail-with-body``; a curl
  that asks for ``-f`` itself is left alone); ``timeout=SECONDS`` (default 300).
- ``<!-- readme-test output -->`` right before any fenced block: the stdout that the last
  block run before it must print. JSON is compared as structure: the same keys, list
  lengths, strings (``...`` inside one matches any text), booleans and nulls, and any number
  where a number is shown; a key ``"...": "..."`` allows more keys and ``["..."]`` any list.
  ``<!-- readme-test output structure -->``: only the keys, list lengths and kinds of values
  (for answers that depend on a fit). Other text must match line for line, ``...`` matching
  any text.
- Blocks without a marker do not run.

A block fails on a non-zero exit (of the block, or of a command it started in the background,
seen when the block ends), on a timeout, or on output that contradicts its output block.
Loopback ports (``127.0.0.1:PORT``, ``localhost:PORT``, ``--port PORT``) are mapped to free
ports, the same port to the same free port, in the blocks and their output alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MARKER = re.compile(r"^<!--\s*readme-test\b(?P<opts>[^>]*?)\s*-->\s*$")
NEAR_MISS = re.compile(r"^\s*<!--\s*readme[\s_-]?tests?\b", re.IGNORECASE)
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[\w+-]*)")
SHELLS = {"bash", "sh", "shell"}
PORT = re.compile(r"(?:(?<=127\.0\.0\.1:)|(?<=localhost:)|(?<=--port )|(?<=--port=))(\d{2,5})\b")
DEFAULT_TIMEOUT_S = 300.0
ELLIPSIS = "..."


class ReadmeError(Exception):
    """A marker that cannot be honoured (the error names the file and line)."""


@dataclass
class Block:
    """One marked shell block, with the output block that follows it, if any."""

    line: int  # 1-based line of the fence in the Markdown file
    code: str
    http_errors: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    expected: str | None = None
    expected_line: int = 0
    structure: bool = False  # compare only the JSON's keys, list lengths and kinds of values


def _fenced(lines: list[str], start: int, where: str) -> tuple[str, str, int]:
    """The info string, body and index after the closing fence of the block at ``start``."""
    m = FENCE.match(lines[start]) if start < len(lines) else None
    if m is None:
        raise ReadmeError(f"{where}: expected a fenced block on the next line")
    fence, body = m["fence"], list[str]()
    for i in range(start + 1, len(lines)):
        if lines[i].startswith(fence):
            return m["info"], "\n".join(body) + "\n", i + 1
        body.append(lines[i])
    raise ReadmeError(f"{where}: expected a closing {fence}, got the end of the file")


def _options(raw: str, where: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for word in raw.split():
        key, _, value = word.partition("=")
        if key not in {"output", "structure", "http-errors", "timeout"}:
            raise ReadmeError(f"{where}: expected options output [structure], http-errors or "
                              f"timeout=S, got {word!r}")
        opts[key] = value
    return opts


def parse(text: str, name: str = "README.md") -> list[Block]:
    """The marked run blocks of a Markdown ``text``, each with its expected output."""
    lines, blocks, i = text.splitlines(), list[Block](), 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        where = f"{name}:{i + 1}"
        if m is None:
            if NEAR_MISS.search(lines[i]):
                raise ReadmeError(f"{where}: expected '<!-- readme-test [options] -->', got "
                                  f"{lines[i].strip()!r}")
            i = _fenced(lines, i, where)[2] if FENCE.match(lines[i]) else i + 1
            continue
        opts = _options(m["opts"], where)
        info, body, after = _fenced(lines, i + 1, where)
        if "output" in opts:
            if not blocks or blocks[-1].expected is not None:
                raise ReadmeError(f"{where}: expected a run block before this output block")
            blocks[-1].expected, blocks[-1].expected_line = body, i + 2
            blocks[-1].structure = "structure" in opts
        else:
            if info not in SHELLS:
                raise ReadmeError(f"{where}: expected a bash block, got {info or 'no language'!r}")
            timeout = float(opts["timeout"]) if opts.get("timeout") else DEFAULT_TIMEOUT_S
            blocks.append(Block(line=i + 2, code=body, http_errors="http-errors" in opts,
                                timeout_s=timeout))
        i = after
    return blocks


def map_ports(blocks: list[Block], free_port: Callable[[], int]) -> dict[int, int]:
    """Rewrite every loopback port in ``blocks`` (code and expected output) to a free one."""
    mapping: dict[int, int] = {}
    for b in blocks:
        for text in (b.code, b.expected or ""):
            for port in PORT.findall(text):
                while int(port) not in mapping:
                    new = free_port()
                    if new not in mapping.values():
                        mapping[int(port)] = new

    def sub(text: str) -> str:
        return PORT.sub(lambda m: str(mapping[int(m[1])]), text)

    for b in blocks:
        b.code = sub(b.code)
        b.expected = None if b.expected is None else sub(b.expected)
    return mapping


# -- output checks ---------------------------------------------------------------------------

def _json_docs(text: str) -> list[Any] | None:
    """The JSON documents ``text`` is made of (``curl`` prints them back to back), or None."""
    decoder, docs, i = json.JSONDecoder(), list[Any](), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return docs or None
        try:
            doc, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        docs.append(doc)


def _like(pattern: str, text: str) -> bool:
    regex = ".*?".join(re.escape(part) for part in pattern.split(ELLIPSIS))
    return re.fullmatch(regex, text, re.DOTALL) is not None


def _kind(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}[type(v)]


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, bool) or v is None else f"{_kind(v)} {v!r}"


def json_diff(want: Any, got: Any, path: str = "$", *, values: bool = True) -> str | None:
    """Where ``got`` contradicts ``want`` (see the module docstring), or None; with
    ``values=False`` only keys, list lengths and the kinds of values count."""
    if isinstance(want, dict) and isinstance(got, dict):
        loose = want.get(ELLIPSIS) == ELLIPSIS
        keys = [k for k in want if k != ELLIPSIS]
        missing = [k for k in keys if k not in got]
        extra = [] if loose else [k for k in got if k not in want]
        if missing or extra:
            return f"{path}: expected keys {keys}, got {list(got)}"
        return next((d for k in keys
                     if (d := json_diff(want[k], got[k], f"{path}.{k}", values=values))), None)
    if isinstance(want, list) and isinstance(got, list):
        if want == [ELLIPSIS]:
            return None
        if len(want) != len(got):
            return f"{path}: expected {len(want)} items, got {len(got)}"
        return next((d for i, (w, g) in enumerate(zip(want, got, strict=True))
                     if (d := json_diff(w, g, f"{path}[{i}]", values=values))), None)
    if _kind(want) != _kind(got):
        return f"{path}: expected {_show(want)}, got {_show(got)}"
    if not values:
        return None
    if isinstance(want, str) and not _like(want, got):
        return f"{path}: expected {want!r}, got {got!r}"
    if isinstance(want, bool | None) and want != got:
        return f"{path}: expected {want!r}, got {got!r}"
    return None


def output_diff(expected: str, actual: str, *, structure: bool = False) -> str | None:
    """Where ``actual`` stdout contradicts the ``expected`` output block, or None
    (``structure``: JSON keys, list lengths and kinds of values only)."""
    want = _json_docs(expected)
    if want is not None:
        got = _json_docs(actual)
        if got is None:
            return f"expected JSON, got {actual[-2000:]!r}"
        if len(got) != len(want):
            return f"expected {len(want)} JSON documents, got {len(got)}"
        return next((d for w, g in zip(want, got, strict=True)
                     if (d := json_diff(w, g, values=not structure))), None)
    def norm(s: str) -> str:
        return "\n".join(line.rstrip() for line in s.strip().splitlines())

    if _like(norm(expected), norm(actual)):
        return None
    return f"expected text like {norm(expected)!r}, got {norm(actual)[-2000:]!r}"
