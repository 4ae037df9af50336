"""The bounded forms of ``python -m bench.fuzz`` and ``python -m bench.load``.

schemathesis generates a few hundred requests across every operation of the live server's
OpenAPI schema (with an API key, a hosted prompt and real path names): zero 5xx and zero
violations of the declared statuses, content types, headers and bodies. A small load run
(4 clients x 10 requests, then again beside one hostile client that sends one request at each
of the server's limits) finishes without an error, each hostile request getting its status.
"""

from __future__ import annotations

import re

import pytest

from bench import fuzz, hostile, load
from server.app import create_app

pytestmark = pytest.mark.slow


def test_schemathesis_bounded_run() -> None:
    status, output = fuzz.run(max_examples=6, seed=0, workers=1, timeout=300)
    summary = fuzz.summary_of(output)
    assert status == 0, summary
    counts = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert counts is not None, summary
    assert int(counts[1]) >= 300 and counts[1] == counts[2], summary
    operations = sum(len(ops) for ops in create_app().openapi()["paths"].values())
    assert operations >= 26  # /v2, /v1/prompts and /v1/fits
    assert f"Selected: {operations}/{operations}" in summary, summary
    assert f"Tested: {operations}" in summary, summary


def test_load_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # one hostile client sends each hostile kind once beside the good ones: each gets its 4xx
    assert load.main(["--clients", "4", "--requests", "10", "--batch", "8",
                      "--hostile-clients", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"good requests, errors\s+40, 0\s+40, 0", out), out
    assert re.search(r"hostile requests, wrong\s+0, 0\s+(\d+), 0", out), out
    assert "good latency p99" in out and "server peak RSS" in out
    for kind in hostile.KINDS:
        assert f"  {kind}: " in out, kind
