"""``reprogram-server --ray``: the app as 2 Ray Serve replicas (a local Ray instance, real
processes on loopback) learns the same prompt as one plain server, and a fit survives the
death of a replica mid-fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_bench_ray import require_ray

from bench.common import free_port, stop_process, wait_ready
from reprogram.config import recommended_config
from reprogram.data import load_dataset
from reprogram.fit import FitResult, fit
from reprogram.http_oracle import HttpOracle

pytestmark = pytest.mark.slow
# each replica reserves one CPU, so Ray gives it one torch thread: the plain server gets one
# too, so that both compute every score with the same kernels
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
READY_S = 150.0
REPLICA_TITLE = b"ServeReplica:reprogram:ReprogramServer"


def start(args: list[str], stack: ExitStack) -> str:
    """``reprogram-server --host 127.0.0.1 --port FREE *args`` until ready; its base URL (the
    process is stopped when ``stack`` closes)."""
    port = free_port()
    log = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed by stack)
    proc = subprocess.Popen([sys.executable, "-m", "server.main", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--no-access-log",
                             *args], stdout=log, stderr=subprocess.STDOUT, env=ENV,
                            cwd=Path(__file__).resolve().parents[1])
    stack.callback(stop_process, proc)  # before the log closes (LIFO)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, log, READY_S)
    return base


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """One Ray Serve deployment of 2 replicas and one plain server, shared by the tests."""
    require_ray()
    with ExitStack() as stack:
        yield {"ray": start(["--ray", "--replicas", "2", "--ray-address", "local"], stack),
               "plain": start([], stack)}


def run_fit(url: str, budget: int, callback: Any = None) -> FitResult:
    cfg = recommended_config("cma", budget=budget, seed=0)
    with HttpOracle(url) as oracle:
        return fit(cfg, oracle, load_dataset("digits", seed=0), callback=callback)


def parameters(result: FitResult) -> dict[str, torch.Tensor]:
    model = result.model
    return {**{f"program.{k}": v for k, v in model.program.state_dict().items()},
            **{f"labelmap.{k}": v for k, v in model.labelmap.state_dict().items()}}


def replica_pids() -> list[int]:
    """Process ids of the Serve replicas (their process titles name the deployment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and REPLICA_TITLE in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_two_replicas_learn_the_same_parameters_as_one_server(servers: dict[str, str]) -> None:
    assert len(replica_pids()) == 2
    on_ray, plain = run_fit(servers["ray"], 1200), run_fit(servers["plain"], 1200)
    assert on_ray.queries["images"] == plain.queries["images"] > 0
    a, b = parameters(on_ray), parameters(plain)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert on_ray.best_val_accuracy == plain.best_val_accuracy
    assert on_ray.test_accuracy == plain.test_accuracy


def test_a_fit_completes_when_a_replica_dies_mid_fit(servers: dict[str, str]) -> None:
    before = replica_pids()
    assert len(before) == 2
    killed: dict[str, int] = {}

    def kill_once(row: dict[str, Any]) -> None:  # mid-fit: once it has queried for a while
        if not killed and row["queries"] >= 1500:
            os.kill(before[0], signal.SIGKILL)
            killed["at"] = int(row["queries"])

    result = run_fit(servers["ray"], 6000, kill_once)
    assert killed, "the fit ended before a replica was killed"
    assert isinstance(result, FitResult) and result.queries["images"] > 0
    assert result.stop_reason == "budget"
    # Serve replaced the dead replica
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(replica_pids()) != 2
                                           or before[0] in replica_pids()):
        time.sleep(0.5)
    after = replica_pids()
    assert len(after) == 2 and before[0] not in after
    assert httpx.get(f"{servers['ray']}/v2/health/ready", timeout=30).status_code == 200
