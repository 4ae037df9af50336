"""The picture routes and the console's static files, in-process (no network).

``GET /v1/prompts/{id}/program.png`` draws the program; ``POST /v1/prompts/{id}/render`` is an
image as the model receives it, equal to the prompt's own rendering; both follow ownership.
The console's files need no key, carry a Content-Security-Policy that lets the page reach only
its own server, and the console adds no route outside the documented API but its files.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ops_support import AsgiClient
from PIL import Image
from prompt_support import png, random_prompt

from reprogram.artifact import loads_prompt
from reprogram.zoo.registry import SourceModel
from server import Settings, create_app
from server.console import STATIC
from server.settings import ApiKey

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef00"
A = {"X-API-Key": ALICE}
B = {"X-API-Key": BOB}
KEYS = (ApiKey(name="alice", secret=ALICE), ApiKey(name="bob", secret=BOB))


@pytest.fixture
def client(model: SourceModel, tmp_path: Path) -> AsgiClient:
    settings = Settings(prompts_dir=str(tmp_path / "prompts"), api_keys=KEYS)
    return AsgiClient(create_app(settings, model=model))


def _upload(client: AsgiClient, data: bytes) -> str:
    response = client.post("/v1/prompts", headers=A,
                           files={"file": ("p.safetensors", data, "application/octet-stream")})
    assert response.status_code == 201, response.text
    pid: str = response.json()["id"]
    return pid


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_program_png_draws_the_programs_pixels(client: AsgiClient) -> None:
    data = random_prompt()
    pid = _upload(client, data)
    response = client.get(f"/v1/prompts/{pid}/program.png", headers=A)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = _image(response.content)
    program = loads_prompt(data).build().program
    want = (program.delta().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert drawn.shape == (32, 32, 3) and np.array_equal(drawn, want)
    assert drawn[16, 16].tolist() == [0, 0, 0]  # the image shows through the pad's hole
    assert client.get(f"/v1/prompts/{pid}/program.png", headers=B).status_code == 404


def test_render_is_the_frame_the_model_receives(client: AsgiClient) -> None:
    data = random_prompt()
    pid = _upload(client, data)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 20, 28), dtype=np.uint8)
    response = client.post(f"/v1/prompts/{pid}/render", headers=A,
                           files={"files": ("x.png", png(image), "image/png")})
    assert response.status_code == 200, response.text
    frame = loads_prompt(data).build().program.render(torch.from_numpy(image)[None])[0]
    want = (frame.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(_image(response.content), want)
    bad = client.post(f"/v1/prompts/{pid}/render", headers=A,
                      files={"files": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 415 and "PNG or JPEG" in bad.json()["error"]
    none = client.post(f"/v1/prompts/{pid}/render", headers=A, data={"other": "1"},
                       files={"x": ("x.png", png(image), "image/png")})
    assert none.status_code == 400 and "'files'" in none.json()["error"]
    other = client.post(f"/v1/prompts/{pid}/render", headers=B,
                        files={"files": ("x.png", png(image), "image/png")})
    assert other.status_code == 404


def test_the_console_is_served_without_a_key_and_reaches_only_its_server(
        client: AsgiClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    for name in ("console.js", "console.css", "icon.svg"):
        asset = client.get(f"/console/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-security-policy"] == csp
        text = asset.text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a URL
        assert "http://" not in text and "https://" not in text, name
    assert "http" not in page.text.replace("http-equiv", "")
    assert client.get("/console/%2e%2e/__init__.py").status_code == 404  # nothing above static/
    assert client.get("/v1/models").status_code == 401  # the API still needs the key


def _paths(routes: Sequence[Any]) -> Iterator[str]:
    """Every route's path, inside included routers too."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _paths(inner.routes)
        else:
            yield route.path


def test_the_console_adds_no_route_outside_the_documented_api(model: SourceModel) -> None:
    app = create_app(Settings(), model=model)
    documented = set(app.openapi()["paths"])
    undocumented = {path for path in _paths(app.routes) if path not in documented}
    assert undocumented == {"/", "/console", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                            "/redoc"}
    assert {"/v1/prompts/{prompt_id}/program.png", "/v1/prompts/{prompt_id}/render"} <= documented
    bare = create_app(Settings(console=False), model=model)
    assert not set(_paths(bare.routes)) & {"/", "/console"}


def test_the_console_files_ship_with_the_package() -> None:
    names = {p.name for p in STATIC.iterdir()}
    assert {"index.html", "console.js", "console.css", "icon.svg"} <= names
    html = (STATIC / "index.html").read_text("utf-8")
    for tab in ("models", "prompts", "try", "jobs"):
        assert f'id="tab-{tab}"' in html and f'id="{tab}"' in html
