"""Memory per request at the limits: the heaviest requests the default limits allow.

``python -m bench.limits`` sends, to a fresh ``reprogram-server`` (default limits, one hosted
prompt) for each, one request of every kind that the limits let grow the most, each at the
limit and accepted (200): V2 binary images of ``--max-request-pixels`` pixels to the hosted
prompt (which takes any size) and to the default model (``--max-images`` images), a V2 JSON
body of ``--max-json-elements`` values, one PNG of ``--max-image-pixels`` pixels to the
prompt's and the model's predict routes, and a prompt upload of ``--max-prompt-bytes`` bytes
(refused after it is read). It prints the server's peak RSS (``VmHWM``) before and after,
and the growth, per kind. Loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import numpy as np
from PIL import Image

from bench.common import peak_rss_mib, server_and_process
from bench.fuzz import demo_prompt
from reprogram import protocol
from server.prompt_store import prompt_id
from server.settings import Settings

D = Settings()
Request = Callable[[httpx.Client, str], httpx.Response]


def _png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise that still compresses
    buf = io.BytesIO()
    Image.fromarray(np.tile(tile, (side // 64, side // 64, 1))).save(buf, format="PNG")
    return buf.getvalue()


def _binary(n: int, side: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).integers(0, 256, (n, 3, side, side), dtype=np.uint8)
    return protocol.encode_request({"image": x}, binary=True)


def kinds() -> dict[str, tuple[Request, int]]:
    """Each heavy request and the status it must get."""
    side = int(D.max_request_pixels ** 0.5)
    prompt_body = _binary(1, side)
    model_body = _binary(D.max_images_per_request, 32)
    n_json = D.max_json_elements // (3 * 32 * 32)
    values = np.zeros((n_json, 3, 32, 32), np.uint8) + 255
    json_body = json.dumps({"inputs": [{"name": "image", "shape": list(values.shape),
                                        "datatype": "UINT8",
                                        "data": values.reshape(-1).tolist()}]}).encode()
    png = _png(int(D.max_image_pixels ** 0.5))
    files = [("files", ("big.png", png, "image/png"))]
    junk = b"\0" * (D.max_prompt_bytes - 1024)
    return {
        f"V2 binary to the prompt: 1 x 3 x {side} x {side} uint8": (lambda h, pid: h.post(
            f"/v2/models/{pid}/infer", content=prompt_body[0], headers=prompt_body[1]), 200),
        f"V2 binary to the model: {D.max_images_per_request} x 3 x 32 x 32": (lambda h, pid: h.post(
            "/v2/models/default/infer", content=model_body[0], headers=model_body[1]), 200),
        f"V2 JSON to the model: {n_json * 3 * 32 * 32} values": (lambda h, pid: h.post(
            "/v2/models/default/infer", content=json_body), 200),
        f"PNG of {side}x{side} to the prompt": (lambda h, pid: h.post(
            f"/v1/prompts/{pid}/predict", files=files), 200),
        f"PNG of {side}x{side} to the model": (lambda h, pid: h.post(
            "/v1/models/default/predict", files=files), 200),
        f"prompt upload of {len(junk)} bytes": (lambda h, pid: h.post(
            "/v1/prompts", files={"file": ("junk.safetensors", junk)}), 400),
    }


def measure() -> list[tuple[str, int, float, float]]:
    """``(kind, status, peak RSS before, after)`` per kind, each on a fresh server."""
    rows = []
    data = demo_prompt()
    pid = prompt_id(data)
    for name, (send, want) in kinds().items():
        with TemporaryDirectory(prefix="reprogram-limits-") as tmp:
            (Path(tmp) / f"{pid}.safetensors").write_bytes(data)
            args = ["--prompts-dir", tmp, "--no-access-log"]
            with server_and_process(args) as (base, proc), httpx.Client(
                    base_url=base, timeout=300) as http:
                small = _binary(1, 32)
                http.post(f"/v2/models/{pid}/infer", content=small[0], headers=small[1])
                before = peak_rss_mib(proc.pid)
                r = send(http, pid)
                if r.status_code != want:
                    raise RuntimeError(f"{name}: HTTP {r.status_code}, expected {want}:"
                                       f" {r.text[:300]}")
                rows.append((name, r.status_code, before, peak_rss_mib(proc.pid)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limits",
                                description=__doc__.split("\n")[0])
    p.parse_args(argv)
    rows = measure()
    print(f"{'request at the default limits':60}{'status':>7}{'peak RSS MiB before':>21}"
          f"{'after':>8}{'growth':>8}")
    for name, status, before, after in rows:
        print(f"{name:60}{status:>7}{before:>21.0f}{after:>8.0f}{after - before:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
