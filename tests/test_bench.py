"""Smoke runs of the benchmarks (``--quick``): they run, print their tables, write their files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: float = 300.0) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_accuracy_quick_prints_table_and_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "acc"
    stdout = _bench("bench.accuracy", "--quick", "--methods", "white-box", "ours",
                    "--out", str(out))
    rows = {line.split()[0]: line for line in stdout.splitlines()
            if line.split() and line.split()[0] in ("white-box", "ours")}
    assert set(rows) == {"white-box", "ours"}
    assert re.search(r"method\s+uint8 4,000", stdout)

    record = json.loads(out.with_suffix(".json").read_text())
    assert {"data", "oracle", "seeds", "budgets", "rows", "summary", "seconds"} <= set(record)
    assert record["data"] == "digits" and record["seeds"] == [0] and record["budgets"] == [4000]
    assert {r["method"] for r in record["rows"]} == {"white-box", "ours"}
    for r in record["rows"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["queries"] <= r["budget"] == 4000 and r["steps"] >= 1
    summary = {s["method"]: s for s in record["summary"]}
    assert set(summary) == {"white-box", "ours"}
    for s in summary.values():
        assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 1.0 and s["n"] == 1
        assert f"{s['mean']:.3f}" in rows[s["method"]]  # the table prints the JSON's figures
    assert summary["white-box"]["mean"] > 0.2  # above chance (10 classes)
    # the ranking a sweep reads is by validation accuracy, test beside it
    head = stdout.index("ranked by validation accuracy, 4,000 queries, uint8 wire")
    ranked = re.findall(r"^\s+\d+\. (\S+)\s+([\d.]+) / ([\d.]+)$", stdout[head:], re.M)
    assert [m for m, _, _ in ranked] == sorted(summary, key=lambda m: -summary[m]["val_mean"])
    for method, val, test in ranked:
        assert val == f"{summary[method]['val_mean']:.3f}"
        assert test == f"{summary[method]['mean']:.3f}"

    with Image.open(out.with_suffix(".png")) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100

    # every finished fit is streamed to OUT.jsonl; --resume reuses it instead of refitting
    streamed = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in streamed) == ["ours", "white-box"]
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--methods", "ours",
                           "--resume", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 1 fits" in proc.stderr and "0 to run" in proc.stderr
    again = json.loads(out.with_suffix(".json").read_text())
    ours = next(r for r in record["rows"] if r["method"] == "ours")
    assert again["rows"] == [ours]
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2  # nothing dropped


def test_accuracy_resume_from_a_damaged_stream_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "acc"
    good = json.dumps({"method": "ours"})  # a JSON line without the fields of a result row
    out.with_suffix(".jsonl").write_text(good + "\n{truncated\n")
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--methods", "ours",
                           "--resume", "--out", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "acc.jsonl:1 is not a result row" in proc.stderr
    assert out.with_suffix(".jsonl").read_text() == good + "\n{truncated\n"  # left as it was


@pytest.mark.parametrize(("spec", "message"), [
    ("bad=estimator:rgf,q:0", "method 'bad': expected q >= 1, got 0"),
    ("bad=estimator:rgf,bogus:1", "method 'bad': "),
    ("ours", "method 'ours': expected a budget of at least"),
    ("nope", "unknown method 'nope'"),
])
def test_accuracy_bad_method_is_a_one_line_error(tmp_path: Path, spec: str,
                                                 message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--methods", spec,
                           "--budgets", "100" if spec == "ours" else "4000",
                           "--out", str(tmp_path / "acc")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "acc.jsonl").exists()


def test_accuracy_failed_fits_are_reported_and_the_grid_goes_on(tmp_path: Path) -> None:
    # nothing listens on port 9: every fit over this endpoint fails, in two worker processes
    out = tmp_path / "acc"
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--endpoint",
                           "http://127.0.0.1:9", "--methods", "ours", "--budgets", "4000", "5000",
                           "--jobs", "2", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.count("FAILED ours seed 0 budget") == 2
    assert "every fit failed" in proc.stderr and "UpstreamUnavailable" in proc.stderr
    assert out.with_suffix(".jsonl").read_text() == ""


def test_accuracy_refuses_white_box_over_an_endpoint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--endpoint",
                           "http://127.0.0.1:9", "--methods", "white-box", "ours",
                           "--out", str(tmp_path / "acc")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "white-box needs exact gradients" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "acc.json").exists()


@pytest.mark.slow
def test_serve_quick_prints_a_throughput_ratio() -> None:
    stdout = _bench("bench.serve", "--quick", "--during-fit")
    latency = next(line for line in stdout.splitlines() if line.startswith("idle p50"))
    values = latency.split()
    assert values[values.index("running") + 2] and float(values[2]) > 0
    assert "job running / idle p50:" in stdout
    header = next(line for line in stdout.splitlines() if "HTTP/in-process" in line)
    assert header.split()[0] == "batch"
    ratios = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            batch, _, local, http, ratio = (float(c) for c in cells[:5])
            assert local > 0 and http > 0
            assert math.isclose(ratio, http / local, rel_tol=0.05, abs_tol=0.01)
            ratios[int(batch)] = ratio
    assert set(ratios) == {64, 256}
    assert all(r > 0 for r in ratios.values())


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "bench" / "overhead.py").exists(), reason="no bench/overhead.py")
def test_overhead_quick_prints_a_wall_time_ratio() -> None:
    stdout = _bench("bench.overhead", "--quick")
    match = re.search(r"HTTP / in-process wall-time ratio: ([0-9.]+)", stdout)
    assert match and float(match.group(1)) > 0
    same = re.search(r"same parameters in both fits: max \|diff\| = (\S+)", stdout)
    assert same and float(same.group(1)) < 1e-6
