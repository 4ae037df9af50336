"""The bounded forms of ``python -m bench.fuzz`` and ``python -m bench.load``.

schemathesis generates a few hundred requests across every operation of the live server's
OpenAPI schema (with an API key, a hosted prompt and real path names): zero 5xx and zero
violations of the declared statuses, content types, headers and bodies. A small load run
(4 clients x 10 requests) finishes without an error.
"""

from __future__ import annotations

import re

import pytest

from bench import fuzz, load

pytestmark = pytest.mark.slow


def test_schemathesis_bounded_run() -> None:
    status, output = fuzz.run(max_examples=6, seed=0, workers=1, timeout=300)
    summary = fuzz.summary_of(output)
    assert status == 0, summary
    counts = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert counts is not None, summary
    assert int(counts[1]) >= 300 and counts[1] == counts[2], summary
    assert "Selected: 20/20" in summary and "Tested: 20" in summary


def test_load_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert load.main(["--clients", "4", "--requests", "10", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "requests 40, errors 0" in out and "images/s" in out and "p99" in out
