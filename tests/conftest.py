"""Shared fixtures: a real ``reprogram-server`` process on a free loopback port.

``live_server(*args)`` starts ``reprogram-server --host 127.0.0.1 --port PORT *args``, waits
until ``/v2/health/ready`` answers 200 and returns the base URL; every process it started is
terminated (then killed) when the requesting module finishes.

``--extended`` (``scripts/test.sh --extended``) also runs the long forms of the tests: those
marked ``extended``, and the fuzzing tests with 10,000 inputs per property instead of a few
hundred (the ``extended_run`` fixture tells a test which run it is in).
"""

from __future__ import annotations

import os

# Before torch loads (test modules import it before reprogram): spinning OpenMP threads make
# every torch call several times slower when a server process shares the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from bench.common import free_port, stop_process, wait_ready
from reprogram.zoo.registry import SourceModel, load_model

__all__ = ["free_port", "server_command", "stop_process", "wait_ready"]  # for test modules

READY_TIMEOUT_S = 90.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the long tests (marked extended): big fits, real-size models;"
                          " fuzzing with 10,000 inputs per property")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--extended"):
        return
    skip = pytest.mark.skip(reason="long test: run with --extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def extended_run(request: pytest.FixtureRequest) -> bool:
    """True in the extended run (``pytest --extended``): the fuzzing tests size themselves."""
    return bool(request.config.getoption("--extended"))


def server_command() -> list[str]:
    """The ``reprogram-server`` console script of this interpreter's environment."""
    script = shutil.which("reprogram-server", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "server.main"]


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
