"""``bench.accuracy --ray``: the same fits as Ray tasks on a local Ray instance give the same
rows and table as the local process, and ``--resume`` skips what the results stream holds;
``bench.serve --replicas`` prints images/s per number of Ray Serve replicas."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the two cheapest methods of the grid, one gradient estimator and one CMA-ES: a few seconds each
METHODS = ("ours", "ours-cma")
# what a fit's row says about the fit itself (not how long it took or where it ran)
SAME = ("method", "seed", "budget", "data", "output", "oracle", "test_accuracy",
        "val_accuracy", "queries", "steps", "config")


def require_ray() -> None:
    """Skip without Ray (fail under ``REPROGRAM_REQUIRE_ALL=1``, as in CI)."""
    if importlib.util.find_spec("ray") is None:
        reason = "ray is not installed (pip install 'reprogram[ray]')"
        if os.environ.get("REPROGRAM_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def accuracy(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.accuracy --quick --threads 1 --out OUT *args``, which must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--threads", "1",
                           "--out", str(out), *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def table(stdout: str) -> list[str]:
    """The printed table and ranking, without the closing line (paths, wall time)."""
    return [line for line in stdout.splitlines() if not line.startswith("wrote ")]


def facts(out: Path) -> list[dict[str, object]]:
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    return [{k: row[k] for k in SAME} for row in rows]


@pytest.mark.slow
def test_ray_tasks_give_the_same_table_and_resume_the_stream(tmp_path: Path) -> None:
    require_ray()
    plain = tmp_path / "plain" / "acc"
    expected = accuracy(plain, "--methods", *METHODS)

    # a sweep that stopped after its first method: the stream holds one finished fit
    on_ray = tmp_path / "ray" / "acc"
    accuracy(on_ray, "--methods", METHODS[0])
    stream = on_ray.with_suffix(".jsonl")
    assert len(stream.read_text().splitlines()) == 1

    resumed = accuracy(on_ray, "--resume", "--ray", "auto", "--methods", *METHODS)
    assert "resuming: 1 fits" in resumed.stderr and "1 to run" in resumed.stderr
    assert "ray: " in resumed.stderr and "1 fits to run" in resumed.stderr
    # the fit that ran on Ray was appended to the stream; the resumed one was not run again
    lines = [json.loads(line) for line in stream.read_text().splitlines()]
    assert [row["method"] for row in lines] == list(METHODS)

    assert facts(on_ray) == facts(plain)  # same seeds: same accuracies, queries and steps
    assert table(resumed.stdout) == table(expected.stdout)


@pytest.mark.slow
def test_serve_replicas_prints_images_per_second_per_replica_count() -> None:
    require_ray()
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--replicas", "1", "2",
                           "--requests", "3", "--clients", "2", "--batches", "8", "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert f"{os.cpu_count()} CPU cores" in lines[0]
    rows = {line[:24].strip(): line.split() for line in lines[3:]}
    assert set(rows) == {"plain (no Ray)", "Ray Serve, 1 replica", "Ray Serve, 2 replicas"}
    for cells in rows.values():
        assert float(cells[-4]) > 0 and cells[-1] == str(os.cpu_count())  # img/s, cores
