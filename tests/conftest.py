"""Shared fixtures: a real ``reprogram-server`` process on a free loopback port.

``live_server(*args)`` starts ``reprogram-server --host 127.0.0.1 --port PORT *args``, waits
until ``/v2/health/ready`` answers 200 and returns the base URL; every process it started is
terminated (then killed) when the requesting module finishes.
"""

from __future__ import annotations

import os

# Before torch loads (test modules import it before reprogram): spinning OpenMP threads make
# every torch call several times slower when a server process shares the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import httpx
import pytest
import torch

from reprogram.zoo.registry import SourceModel, load_model

READY_TIMEOUT_S = 90.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command() -> list[str]:
    """The ``reprogram-server`` console script of this interpreter's environment."""
    script = shutil.which("reprogram-server", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "server.main"]


def _tail(log: IO[bytes], limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-limit:]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (then kill it if it lingers past 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_ready(
    base_url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float
) -> None:
    """Poll ``/v2/health/ready`` until 200; fail with the server's log if it dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with status {proc.returncode} before ready:\n{_tail(log)}"
            )
        try:
            if httpx.get(f"{base_url}/v2/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{_tail(log)}")


@pytest.fixture(scope="module")
def live_server() -> Iterator[Callable[..., str]]:
    """Factory: ``live_server("--output", "logits")`` -> ``"http://127.0.0.1:PORT"``."""
    with ExitStack() as stack:

        def start(*args: str, timeout: float = READY_TIMEOUT_S) -> str:
            port = free_port()
            log = stack.enter_context(tempfile.TemporaryFile())
            cmd = [*server_command(), "--host", "127.0.0.1", "--port", str(port), *args]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop_process, proc)  # runs before the log closes (LIFO)
            base_url = f"http://127.0.0.1:{port}"
            wait_ready(base_url, proc, log, timeout)
            return base_url

        yield start


@pytest.fixture(scope="session")
def model() -> SourceModel:
    """The shipped default source model (frozen; shared by every test)."""
    return load_model("default")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (the suite shares 2 cores with server processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
