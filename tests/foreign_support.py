"""Third-party model servers for the tests: KServe's Python server and TorchServe, for real.

Both run from the virtual environments scripts/setup-test-env.sh makes (``.venvs/kserve``,
``.venvs/torchserve``), serve the shipped default model (tests/kserve_predictor.py,
tests/torchserve_handler.py) on free loopback ports, and are stopped when the test module ends.
Where one is not installed the tests that need it skip with the reason, or fail under
``REPROGRAM_REQUIRE_ALL=1`` (scripts/test.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from bench.common import free_port, stop_process, stop_process_group
from reprogram.data import load_dataset
from reprogram.zoo.registry import load_model

ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(os.environ.get("REPROGRAM_VENVS") or ROOT / ".venvs")  # as setup-test-env.sh
START_TIMEOUT_S = 180.0


def require(path: Path, what: str) -> Path:
    """``path``, or skip (fail under REPROGRAM_REQUIRE_ALL=1) when it is missing."""
    if not path.exists():
        reason = f"{what} is not installed ({path} missing; run scripts/setup-test-env.sh)"
        if os.environ.get("REPROGRAM_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, ok: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200 and ok in r.text:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S:.0f} s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def kserve_server() -> Iterator[str]:
    """KServe's ModelServer with tests/kserve_predictor.py; yields its base URL."""
    python = require(VENVS / "kserve" / "bin" / "python", "KServe (package kserve)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "kserve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(python), str(ROOT / "tests" / "kserve_predictor.py"), "--http_port",
                 str(port), "--grpc_port", str(free_port())],
                stdout=out, stderr=subprocess.STDOUT, env=_env())
            try:
                _wait(f"http://127.0.0.1:{port}/v2/health/ready", proc, log, "true")
                yield f"http://127.0.0.1:{port}"
            finally:
                stop_process(proc)


def _archive(store: Path, work: Path, archiver: Path) -> None:
    """The default model as TorchScript, archived twice: ``default`` and ``jpeg-only``."""
    source = load_model("default")
    with torch.no_grad():
        traced = torch.jit.trace(source.module, torch.rand(1, 3, 32, 32))
    traced.save(str(work / "default.pt"))
    (work / "index_to_name.json").write_text(json.dumps(
        {str(i): n for i, n in enumerate(source.meta.class_names)}))
    for name in ("default", "jpeg-only"):
        subprocess.run([str(archiver), "--model-name", name, "--version", "1.0",
                        "--serialized-file", str(work / "default.pt"), "--handler",
                        str(ROOT / "tests" / "torchserve_handler.py"), "--extra-files",
                        str(work / "index_to_name.json"), "--export-path", str(store),
                        "--archive-format", "no-archive"], check=True, capture_output=True)


@contextmanager
def torchserve_server(batch_size: int = 1, max_batch_delay_ms: int = 10) -> Iterator[str]:
    """TorchServe serving the default model (stock image classifier); yields its base URL.
    ``batch_size`` > 1 turns on TorchServe's server-side batching of the ``default`` model:
    up to that many concurrent requests, waiting at most ``max_batch_delay_ms``, in one
    forward pass."""
    bin_dir = require(VENVS / "torchserve" / "bin", "TorchServe (package torchserve)")
    require(bin_dir / "torchserve", "TorchServe (package torchserve)")
    if shutil.which("java") is None:
        reason = "TorchServe needs a Java runtime (openjdk-17-jre-headless)"
        if os.environ.get("REPROGRAM_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        _archive(store, work, bin_dir / "torch-model-archiver")
        port, management, metrics = free_port(), free_port(), free_port()
        config = work / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{port}\n"
            f"management_address=http://127.0.0.1:{management}\n"
            f"metrics_address=http://127.0.0.1:{metrics}\n"
            f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
            "default_workers_per_model=1\ndisable_token_authorization=true\n"
            "install_py_dep_per_model=false\n" + _batching(batch_size, max_batch_delay_ms))
        env = _env()
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(work / "logs")
        env["TMPDIR"] = str(work)  # its pid file: TorchServe refuses to start beside another
        log = work / "torchserve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs",
                 "--model-store", str(store), "--models", "default=default",
                 "jpeg-only=jpeg-only", "--ts-config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work,
                start_new_session=True)  # its Java frontend and workers: one process group
            try:
                url = f"http://127.0.0.1:{port}"
                _wait(f"{url}/ping", proc, log, "Healthy")
                _wait_model(url, proc, log)
                yield url
            finally:
                stop_process_group(proc)


def _batching(batch_size: int, delay_ms: int) -> str:
    """The ``models`` property that gives the ``default`` model a batch size (TorchServe's
    docs/batch_inference_with_ts.md, "config.properties")."""
    if batch_size <= 1:
        return ""
    version = {"defaultVersion": True, "marName": "default", "minWorkers": 1,
               "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": delay_ms,
               "responseTimeout": 120}
    return "models=" + json.dumps({"default": {"1.0": version}}) + "\n"


def _wait_model(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the default model's worker answers a prediction (it loads after /ping)."""
    from reprogram.wire import Wire, encode_image

    image = encode_image(torch.zeros(3, 32, 32, dtype=torch.uint8).numpy(), Wire("png"))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.post(f"{url}/predictions/default", content=image,
                          timeout=30.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"TorchServe model not ready:\n{log.read_text(errors='replace')[-3000:]}")


def two_digits(root: Path) -> Path:
    """Digits 0 and 1 as a class-per-folder dataset of PNG files (360 images): a target
    task on which a fit of about 2,000 image queries is well above chance (0.5)."""
    data = load_dataset("digits")
    for c in ("0", "1"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        if int(label) in (0, 1):
            Image.fromarray(image[0].numpy()).save(root / str(int(label)) / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    """``python tests/foreign_support.py torchserve|kserve [--batch-size N]``: start one of
    the servers as the tests do, print its base URL, and serve until SIGINT or SIGTERM (the
    300k figures against third-party servers in the README were fitted against these)."""
    import argparse
    import signal
    import threading

    p = argparse.ArgumentParser(prog="python tests/foreign_support.py")
    p.add_argument("server", choices=("torchserve", "kserve"))
    p.add_argument("--batch-size", type=int, default=1, help="TorchServe's server-side batch")
    p.add_argument("--max-batch-delay-ms", type=int, default=10)
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = (torchserve_server(args.batch_size, args.max_batch_delay_ms)
               if args.server == "torchserve" else kserve_server())
    with started as url:
        print(url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
