"""Helpers for the tuning-job tests: a digits ImageFolder, archives, job polling."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from prompt_support import ServerProcess, model_server

from reprogram.artifact import load_prompt
from reprogram.data import load_digits

KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}


def digits_folder(root: Path, per_class: int | None = None) -> Path:
    """Digits as an ImageFolder of PNGs (``per_class`` images of each class, or all)."""
    data = load_digits()
    counts: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / data.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")
    return root


def png_bytes(side: int = 8, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def small_imagefolder(classes: int = 2, per_class: int = 3) -> dict[str, bytes]:
    return {f"c{c}/{i}.png": png_bytes(value=40 * c + i) for c in range(classes)
            for i in range(per_class)}


def jobs_server(jobs_dir: Path, *args: str, keys_file: Path | None = None) -> ServerProcess:
    extra = ["--api-keys-file", str(keys_file)] if keys_file is not None else []
    return model_server("--fit-workers", "1", "--jobs-dir", str(jobs_dir), "--prompts-dir",
                        str(jobs_dir.parent / "prompts"), *extra, *args)


def keys_file(folder: Path) -> Path:
    path = folder / "keys.txt"
    path.write_text("".join(f"{name}:{secret}\n" for name, secret in KEYS.items()))
    return path


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def submit(url: str, config: dict[str, Any], archive: bytes,
           headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/fits", headers=headers or {}, timeout=60,
                      files={"data": ("data.zip", archive, "application/zip")},
                      data={"config": json.dumps(config)})


def wait_for(url: str, job_id: str, until: Any, headers: dict[str, str] | None = None,
             timeout: float = 240.0) -> dict[str, Any]:
    """Poll the job until ``until(job)`` holds (fails on timeout with the last view)."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/v1/fits/{job_id}", headers=headers or {}, timeout=30)
        assert response.status_code == 200, response.text
        job = response.json()
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def prompt_tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_prompt(path).tensors)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
