"""API keys, prompt ownership and the OpenAPI contract, in-process (no network).

Without a valid key every route but the health probes (and the schema) answers 401 with
``{"error": ...}`` and ``WWW-Authenticate: Bearer``; a key is accepted as ``Authorization:
Bearer`` or ``X-API-Key``; another key's prompt is unknown (404) on every route, including
the "expected one of" list; ownership survives a restart; the key itself never reaches a log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from ops_support import AsgiClient, infer_body
from prompt_support import png, random_prompt

from reprogram.errors import ConfigError
from reprogram.zoo.registry import SourceModel
from server import Settings, create_app
from server.gate import KeyRing, load_api_keys, presented_key
from server.main import main, parse_settings
from server.prompt_store import OWNERS_SUFFIX
from server.settings import ApiKey

ALICE = "alice-0123456789abcdef"
BOB = "bob-0123456789abcdef00"
KEYS = (ApiKey(name="alice", secret=ALICE), ApiKey(name="bob", secret=BOB))
A = {"Authorization": f"Bearer {ALICE}"}
B = {"X-API-Key": BOB}


def make(model: SourceModel, prompts: Path | None = None, **opts: object) -> AsgiClient:
    settings = Settings(max_images_per_request=64, prompts_dir=str(prompts) if prompts else None,
                        **opts)  # type: ignore[arg-type]
    return AsgiClient(create_app(settings, model=model))


@pytest.fixture
def client(model: SourceModel, tmp_path: Path) -> AsgiClient:
    return make(model, tmp_path / "prompts", api_keys=KEYS)


PROTECTED = [("GET", "/v2"), ("GET", "/v2/models/default"), ("GET", "/v2/models/default/ready"),
             ("POST", "/v2/models/default/infer"), ("GET", "/v1/models"),
             ("GET", "/v1/models/default"), ("POST", "/v1/models/default/predict"),
             ("GET", "/v1/prompts"), ("POST", "/v1/prompts"), ("GET", "/v1/prompts/abc"),
             ("DELETE", "/v1/prompts/abc"), ("GET", "/metrics"), ("GET", "/v1/usage"),
             ("GET", "/v2/nothing")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_no_key_and_wrong_key_get_401(client: AsgiClient, method: str, path: str) -> None:
    for headers, why in (({}, "missing API key"), ({"X-API-Key": "nope"}, "invalid API key"),
                         ({"Authorization": f"Bearer {ALICE}x"}, "invalid API key"),
                         ({"Authorization": f"Basic {ALICE}"}, "missing API key")):
        r = client.request(method, path, headers=headers, content=b"x" * 100)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"].startswith(why)
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_right_key_either_header(client: AsgiClient) -> None:
    body, headers = infer_body()
    for auth in (A, B, {"authorization": f"bearer {ALICE}"}):
        assert client.get("/v2/models/default", headers=auth).status_code == 200
        r = client.post("/v2/models/default/infer", content=body, headers={**headers, **auth})
        assert r.status_code == 200, r.text
    assert client.get("/v1/usage", headers=A).json()["key"] == "alice"


def test_health_and_schema_stay_open(client: AsgiClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    schema = client.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "security" not in schema["paths"]["/v2/health/ready"]["get"]
    assert schema["paths"]["/v2"]["get"]["security"] == [{"bearer": []}, {"apiKey": []}]


def test_open_server_is_unchanged(model: SourceModel) -> None:
    c = make(model)
    assert c.get("/v2/models/default").status_code == 200
    assert c.get("/v1/usage").json()["key"] == "anonymous"
    assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})


def _upload(c: AsgiClient, data: bytes, headers: dict[str, str]) -> tuple[int, str]:
    r = c.post("/v1/prompts", files={"file": ("p.safetensors", data)}, headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.status_code, r.json()["id"]


def _visible_routes(c: AsgiClient, pid: str, headers: dict[str, str]) -> list[int]:
    body, h = infer_body()
    files = [("files", ("a.png", png(np.zeros((3, 20, 20), np.uint8)), "image/png"))]
    return [c.get(f"/v1/prompts/{pid}", headers=headers).status_code,
            c.get(f"/v2/models/{pid}", headers=headers).status_code,
            c.get(f"/v2/models/{pid}/ready", headers=headers).status_code,
            c.get(f"/v1/models/{pid}", headers=headers).status_code,
            c.post(f"/v2/models/{pid}/infer", content=body, headers={**h, **headers}).status_code,
            c.post(f"/v1/prompts/{pid}/predict", files=files, headers=headers).status_code]


def test_prompts_are_owned_by_their_key(client: AsgiClient, tmp_path: Path) -> None:
    data = random_prompt(seed=3)
    status, pid = _upload(client, data, A)
    assert status == 201 and _upload(client, data, A) == (200, pid)
    assert _visible_routes(client, pid, A) == [200] * 6
    assert _visible_routes(client, pid, B) == [404] * 6
    assert [p["id"] for p in client.get("/v1/prompts", headers=A).json()["prompts"]] == [pid]
    assert client.get("/v1/prompts", headers=B).json() == {"prompts": []}
    r = client.get("/v2/models/nope", headers=B)
    assert r.status_code == 404 and pid not in r.text
    assert client.delete(f"/v1/prompts/{pid}", headers=B).status_code == 404
    assert (tmp_path / "prompts" / f"{pid}.safetensors").exists()
    owners = tmp_path / "prompts" / f"{pid}{OWNERS_SUFFIX}"
    assert json.loads(owners.read_text()) == ["alice"]
    # bob uploads the same bytes: he becomes a co-owner (201 for him), alice keeps it
    assert _upload(client, data, B) == (201, pid)
    assert _upload(client, data, B) == (200, pid)
    assert json.loads(owners.read_text()) == ["alice", "bob"]
    assert client.delete(f"/v1/prompts/{pid}", headers=A).json() == {"deleted": pid}
    assert _visible_routes(client, pid, A) == [404] * 6
    assert _visible_routes(client, pid, B) == [200] * 6
    assert client.delete(f"/v1/prompts/{pid}", headers=B).status_code == 200
    assert not owners.exists() and not (tmp_path / "prompts" / f"{pid}.safetensors").exists()


def test_ownership_survives_restart_and_public_prompts(model: SourceModel, tmp_path: Path) -> None:
    folder = tmp_path / "prompts"
    public = random_prompt(seed=4)
    _, public_id = _upload(make(model, folder), public, {})  # uploaded without keys: public
    _, private_id = _upload(make(model, folder, api_keys=KEYS), random_prompt(seed=5), A)
    (folder / f".upload-crash{OWNERS_SUFFIX}").write_text("[]")  # debris is ignored
    (folder / f"0123456789abcdef{OWNERS_SUFFIX}").write_text('["bob"]')  # orphan: removed
    c = make(model, folder, api_keys=KEYS)
    assert {p["id"] for p in c.get("/v1/prompts", headers=A).json()["prompts"]} == {
        public_id, private_id}
    assert [p["id"] for p in c.get("/v1/prompts", headers=B).json()["prompts"]] == [
        public_id]
    assert c.get(f"/v1/prompts/{private_id}", headers=B).status_code == 404
    r = c.delete(f"/v1/prompts/{public_id}", headers=B)
    assert r.status_code == 403 and "operator" in r.json()["error"]
    assert not (folder / f"0123456789abcdef{OWNERS_SUFFIX}").exists()


def test_keys_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# operators\n\nalice:" + ALICE + "\n  " + BOB + "  \n")
    keys = load_api_keys(str(path), {"REPROGRAM_API_KEYS": "carol:carol-secret-123456789, "})
    assert [k.name for k in keys] == ["alice", keys[1].name, "carol"]
    assert keys[1].name.startswith("key-") and BOB not in keys[1].name
    assert ALICE not in repr(keys) and BOB not in repr(Settings(api_keys=keys))
    ring = KeyRing(keys)
    assert ring.identify(ALICE) == "alice" and ring.identify(BOB) == keys[1].name
    assert ring.identify("alice") is None and ring.identify("") is None
    assert presented_key({"authorization": "Bearer  xyz "}) == "xyz"
    assert presented_key({"authorization": "Bearer"}) is None
    settings = parse_settings(["--api-keys-file", str(path)])
    assert len(settings.api_keys) == 2
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    for bad in (str(empty), str(tmp_path / "missing")):
        with pytest.raises(ConfigError):
            load_api_keys(bad, {})
    with pytest.raises(ConfigError, match="unique API key names"):
        load_api_keys(None, {"REPROGRAM_API_KEYS": f"a:{ALICE},a:{BOB}"})
    with pytest.raises(ConfigError, match="entry 1"):
        load_api_keys(None, {"REPROGRAM_API_KEYS": "bad name:xyz"})
    assert main(["--api-keys-file", str(tmp_path / "missing")]) == 2


def test_the_key_never_reaches_the_logs(client: AsgiClient,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body, headers = infer_body()
    client.post("/v2/models/default/infer", content=body, headers={**headers, **A})
    client.post("/v2/models/default/infer", content=b"{", headers=A)
    client.get("/v2", headers={"X-API-Key": ALICE + "x"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ALICE not in text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "server.access"]
    assert [(x["route"], x["status"], x["key"]) for x in lines] == [
        ("/v2/models/{model_name}/infer", 200, "alice"),
        ("/v2/models/{model_name}/infer", 400, "alice"), ("/v2", 401, "anonymous")]
    assert lines[0]["images"] == 2 and lines[0]["model"] == "default"
    assert set(lines[0]) == {"ts", "method", "route", "status", "duration_ms", "images", "key",
                             "client", "model"}


def test_openapi_declares_every_error(client: AsgiClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            codes = set(op["responses"])
            if path.startswith("/v2/health"):
                continue
            assert "401" in codes, (method, path)
            for code in codes - {"200", "201", "202", "503"}:
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, code)
    infer = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert {"400", "403", "404", "413", "429"} <= set(infer["responses"])
    assert "Retry-After" in infer["responses"]["429"]["headers"]
    assert set(infer["responses"]["200"]["content"]) == {"application/json",
                                                          "application/octet-stream"}
