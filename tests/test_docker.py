"""The Dockerfile, exercised without Docker: its CMD serves, its HEALTHCHECK tells ready from
down, and it pins what pyproject.toml pins.

The exec-form ``CMD`` and ``HEALTHCHECK CMD`` JSON arrays are read from the Dockerfile itself
and run as real processes (the port swapped for a free one; the server binds 0.0.0.0 as in the
image and is reached on 127.0.0.1), with this environment's ``bin`` first on ``PATH`` so that
``reprogram-server`` and ``python`` resolve as they do in the image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, stop_process, wait_ready

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_PORT = "8000"


def _instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments gone."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends with a line continuation"
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _one(name: str) -> str:
    found = [rest for word, rest in _instructions() if word == name]
    assert len(found) == 1, f"expected one {name} in the Dockerfile, got {len(found)}"
    return found[0]


def _exec_form(text: str) -> list[str]:
    argv = json.loads(text)
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), text
    return argv


def cmd_argv() -> list[str]:
    return _exec_form(_one("CMD"))


def healthcheck_argv() -> list[str]:
    rest = _one("HEALTHCHECK")
    match = re.search(r"(?:^|\s)CMD\s+(\[.*\])\s*$", rest)
    assert match, f"expected an exec-form HEALTHCHECK CMD, got {rest!r}"
    return _exec_form(match.group(1))


def _with_port(argv: list[str], port: int) -> list[str]:
    return [a.replace(IMAGE_PORT, str(port)) for a in argv]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The image's CMD running on a free port (cwd: an empty home, as in the image)."""
    port = free_port()
    argv = cmd_argv()
    assert argv[argv.index("--port") + 1] == IMAGE_PORT
    argv[argv.index("--port") + 1] = str(port)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                cwd=tmp_path)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, log, 90.0)
            yield proc, port
        finally:
            stop_process(proc)


def _healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_with_port(healthcheck_argv(), port), capture_output=True, text=True,
                          timeout=30, env=_env(), check=False)


@pytest.mark.slow
def test_cmd_serves_and_healthcheck_tells_ready_from_down(
        served: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = served
    argv = cmd_argv()
    assert argv[0] == "reprogram-server"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    ok = _healthcheck(port)
    assert ok.returncode == 0, ok.stderr
    proc.terminate()
    proc.wait(timeout=10)
    down = _healthcheck(port)
    assert down.returncode != 0


def test_healthcheck_probes_readiness_on_the_exposed_port() -> None:
    joined = " ".join(healthcheck_argv())
    assert f"127.0.0.1:{IMAGE_PORT}/v2/health/ready" in joined
    assert "timeout=" in joined  # a hung server fails the check instead of stalling it
    assert _one("EXPOSE").split() == [IMAGE_PORT]
    assert re.search(r"--timeout=\d+s", _one("HEALTHCHECK"))


def test_pins_match_pyproject_and_runs_as_non_root() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {m.group(1): m.group(2) for d in deps
            if (m := re.fullmatch(r"(torch|torchvision)==(\S+)", d.replace(" ", "")))}
    assert set(pins) == {"torch", "torchvision"}
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    for name, version in pins.items():
        found = re.findall(rf"(?<![\w-]){name}==(\S+)", runs)
        assert found == [version], f"{name}: Dockerfile pins {found}, pyproject {version}"
    assert "download.pytorch.org/whl/cpu" in runs  # CPU-only wheels
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert _instructions()[0][0] == "FROM" and "slim" in _instructions()[0][1]
    assert "HEALTHCHECK" in {word for word, _ in _instructions()}
