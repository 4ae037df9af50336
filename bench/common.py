"""Shared by the benchmarks: a real ``reprogram-server`` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO

import httpx

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(log: IO[bytes], limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-limit:]


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: IO[bytes] | None = None,
               timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``/v2/health/ready`` until 200; raise if the process dies or it takes too long,
    with the end of the server's ``log`` when given."""
    def failure(what: str) -> RuntimeError:
        return RuntimeError(what + (f":\n{_tail(log)}" if log is not None else ""))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise failure(f"server exited with status {proc.returncode} before ready")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise failure(f"server not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (then kill it if it lingers past 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Terminate ``proc``'s process group (it was started with ``start_new_session=True``):
    the leader and whatever it started, then kill what lingers past ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that only live members keep the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@contextmanager
def server_process(args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                   timeout: float = READY_TIMEOUT_S) -> Iterator[str]:
    """Run ``reprogram-server --host 127.0.0.1 --port FREE *args``; yield its base URL and
    always terminate it."""
    with server_and_process(args, env, timeout) as (base, _):
        yield base


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (``VmHWM``) of process ``pid`` so far, in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


@contextmanager
def server_and_process(args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                       timeout: float = READY_TIMEOUT_S
                       ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`server_process` that also yields the process (for its memory)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.main", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None)
        try:
            wait_ready(base, proc, log, timeout)
            yield base, proc
        finally:
            stop_process(proc)
