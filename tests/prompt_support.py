"""Helpers for the hosted-prompt tests: server processes, one endpoint fit, PNGs, bad artifacts.

The endpoint fit runs once per pytest session: its artifact is kept under pytest's base
temporary folder and reused by every module that asks for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import torch
from conftest import free_port, server_command, wait_ready
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from reprogram.artifact import Prompt, dump_prompt, load_prompt
from reprogram.commands import evaluation_split
from reprogram.data import TargetDataset, load_dataset
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.pipeline import Reprogrammer
from reprogram.programs import ProgramSpec, build_program
from reprogram.zoo.registry import load_model

FIT_BUDGET = 15000
FIT_ARGS = ("--data", "digits", "--budget", str(FIT_BUDGET), "--labelmap", "linear",
            "--resolution", "8", "--seed", "0", "--no-progress")


def cli_command() -> list[str]:
    """The ``reprogram`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "reprogram"
    return [str(script)] if script.exists() else [sys.executable, "-m", "reprogram.cli"]


def run_cli(*args: str, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``reprogram ARGS`` and parse the JSON it prints (fails with its stderr)."""
    proc = subprocess.run([*cli_command(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"reprogram {args[0]} failed:\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


class ServerProcess:
    """A server command (``reprogram-server`` or ``reprogram serve``) on a free loopback port."""

    def __init__(self, command: list[str], timeout: float = 90.0) -> None:
        self.command = command
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (open while the process runs)
        cmd = [*self.command, "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url, self.proc, self.log, self.timeout)
        return self.url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.close()
        self.proc = self.log = None

    def restart(self) -> str:
        self.stop()
        return self.start()

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")


def model_server(*args: str) -> ServerProcess:
    return ServerProcess([*server_command(), "--log-level", "warning", *args])


def serve_process(*args: str) -> ServerProcess:
    return ServerProcess([*cli_command(), "serve", "--log-level", "warning", *args])


def fitted_prompt(base_temp: Path, endpoint: str) -> Path:
    """A prompt fitted with ``reprogram fit --endpoint`` (once per session, then reused)."""
    out = base_temp / "endpoint-fit" / "digits.safetensors"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = run_cli("fit", "--endpoint", endpoint, *FIT_ARGS, "--out", str(out))
        assert summary["queries"]["images"] <= FIT_BUDGET
    return out


def held_out_split(prompt_path: Path) -> TargetDataset:
    """The held-out split that ``reprogram eval`` evaluates the prompt on."""
    prompt = load_prompt(prompt_path)
    return evaluation_split(prompt, load_dataset("digits", seed=prompt.seed), "test")


def png(image: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[C, H, W]`` image (C = 1 or 3)."""
    arr = np.asarray(image, dtype=np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def prompt_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def upload(http: httpx.Client, data: bytes, name: str = "p.safetensors") -> httpx.Response:
    return http.post("/v1/prompts", files={"file": (name, data, "application/octet-stream")})


def predict_probs(http: httpx.Client, pid: str, pngs: list[bytes]) -> tuple[np.ndarray, list]:
    """Full target probabilities ``[N, K]`` and the raw predictions from the predict route."""
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    r = http.post(f"/v1/prompts/{pid}/predict", files=files, params={"top_k": 1000})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = np.zeros((len(preds), len(preds[0]["top"])), dtype=np.float32)
    for row, pred in zip(probs, preds, strict=True):
        for entry in pred["top"]:
            row[entry["index"]] = entry["score"]
    return probs, preds


def random_prompt(*, frame: tuple[int, int] = (32, 32), num_source: int = 10,
                  weights_sha256: str | None = None, seed: int = 1,
                  metrics: dict[str, Any] | None = None) -> bytes:
    """A valid (untrained, random) prompt artifact for the default model, or for another."""
    torch.manual_seed(seed)
    program = build_program(ProgramSpec(kind="pad", frame_size=frame, inner_size=16,
                                        resolution=8))
    with torch.no_grad():
        program.theta.normal_()
    labelmap = build_labelmap(LabelMapSpec(kind="linear", num_source=num_source, num_target=10))
    source = dict(load_model().meta.fingerprint())
    if weights_sha256 is not None:
        source["weights_sha256"] = weights_sha256
    prompt = Prompt.from_reprogrammer(Reprogrammer(program, labelmap),
                                      target_classes=tuple(str(i) for i in range(10)),
                                      source=source, seed=seed, metrics=metrics or {})
    return dump_prompt(prompt)


def with_schema_version(data: bytes, version: int) -> bytes:
    """The same prompt with another ``schema_version`` in its metadata."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["reprogram"])
    meta["schema_version"] = version
    return st_save(st_load(data), metadata={"reprogram": json.dumps(meta)})


def listing(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (hidden ones too) with its bytes."""
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}



def split_artifact(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata record (digest included) and the tensors of a prompt file."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return json.loads(header["__metadata__"]["reprogram"]), st_load(data)


def resign(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """A prompt file with these metadata and tensors and a VALID digest: a forger's file."""
    from reprogram.artifact import _digest

    meta = {k: v for k, v in meta.items() if k != "digest"}
    meta["digest"] = _digest(meta, tensors)
    return st_save(tensors, metadata={"reprogram": json.dumps(meta)})
