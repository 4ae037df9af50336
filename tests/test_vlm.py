"""Vision-language models: ``shapes-clip``, zero-shot classification, CoOp, the zero-shot API.

The zero-shot API of a real ``reprogram-server --model shapes-clip`` answers the local model's
probabilities for JSON and binary requests and validates its BYTES labels; CoOp's gradient
reaches only the context vectors; context artifacts round-trip and refuse a model they do not
fit; a black-box pixel prompt learns through the zero-shot API with the target's class names as
its labels (no label map).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prompt_support import ServerProcess, cli_command, model_server, png, run_cli

from reprogram import protocol
from reprogram.artifact import load_prompt
from reprogram.context import ContextSpec
from reprogram.data import load_dataset
from reprogram.errors import ConfigError
from reprogram.vlm import ZeroShotClassifier, with_classes
from reprogram.zoo.clip import ShapesCLIP, tokenize
from reprogram.zoo.registry import load_model

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
INFER = "/v2/models/shapes-clip/infer"


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server: ServerProcess = model_server("--model", "shapes-clip", "--prompts-dir",
                                         str(tmp_path_factory.mktemp("clip-prompts")))
    yield server.start()
    server.stop()


def _images(n: int = 5) -> np.ndarray:
    return load_dataset("colours").images[:n].numpy()


def _request(labels: object, images: np.ndarray, binary: bool,
             template: str | None = None) -> tuple[bytes, dict[str, str]]:
    return protocol.encode_request(
        {"image": images, "labels": np.array(labels, dtype=object)}, binary=binary,
        parameters={"template": template} if template else None)


@pytest.mark.parametrize("binary", [False, True])
def test_the_zero_shot_api_answers_the_local_models_probabilities(clip_server: str,
                                                                   binary: bool) -> None:
    images = _images()
    body, headers = _request(COLOURS, images, binary, template="a {} shape.")
    response = httpx.post(clip_server + INFER, content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    probs = protocol.decode_response(response.content, response.headers)[0]["probs"]
    local = with_classes(load_model("shapes-clip"), COLOURS, "a {} shape.")
    with torch.no_grad():
        want = torch.softmax(local.module(torch.from_numpy(images).float() / 255.0), -1)
    assert probs.shape == (5, 6)
    assert float(np.abs(probs - want.numpy()).max()) < 1e-5


@pytest.mark.parametrize(("labels", "says"), [
    ([], "at least one"),
    ([f"colour {i}" for i in range(257)], "at most 256"),
    (["x" * 49], "at most 48 characters"),
    (["red", "red"], "distinct"),
    (["  "], "non-empty"),
])
def test_bad_labels_are_a_400_in_words(clip_server: str, labels: list[str], says: str) -> None:
    body, headers = _request(labels, _images(1), binary=False)
    response = httpx.post(clip_server + INFER, content=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]


def test_labels_that_are_not_utf8_or_a_bad_template_are_refused(clip_server: str) -> None:
    body, headers = _request([b"\xff\xfe", b"ok"], _images(1), binary=True)
    response = httpx.post(clip_server + INFER, content=body, headers=headers, timeout=60)
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]
    body, headers = _request(COLOURS, _images(1), binary=False, template="no slot")
    response = httpx.post(clip_server + INFER, content=body, headers=headers, timeout=60)
    assert response.status_code == 400 and "'{}'" in response.json()["error"]
    meta = httpx.get(clip_server + "/v2/models/shapes-clip", timeout=30).json()
    assert [t["name"] for t in meta["inputs"]] == ["image", "labels"]
    assert meta["parameters"]["zero_shot"]["template"] == "a photo of a {}."


def test_v1_predict_takes_candidate_labels(clip_server: str) -> None:
    images = _images(3)
    files = [("files", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(images)]
    response = httpx.post(clip_server + "/v1/models/shapes-clip/predict?top_k=2", files=files,
                          data={"labels": list(COLOURS)}, timeout=60)
    assert response.status_code == 200, response.text
    tops = [p["top"] for p in response.json()["predictions"]]
    assert all(len(t) == 2 and {e["label"] for e in t} <= set(COLOURS) for t in tops)
    body, headers = _request(COLOURS, images, binary=False)
    answer = httpx.post(clip_server + INFER, content=body, headers=headers, timeout=60)
    probs = protocol.decode_response(answer.content, answer.headers)[0]["probs"]
    assert [t[0]["label"] for t in tops] == [COLOURS[i] for i in probs.argmax(1)]
    plain = httpx.post(clip_server + "/v1/models/shapes-clip/predict", files=files[:1],
                       timeout=60).json()["predictions"][0]["top"]
    assert plain[0]["label"] in load_model("shapes-clip").meta.class_names


def _tiny_classifier() -> ZeroShotClassifier:
    torch.manual_seed(0)
    clip = ShapesCLIP(width=8, text_width=16, embed=16)
    for p in clip.parameters():
        p.requires_grad_(False)
    return ZeroShotClassifier(clip, (0.5,) * 3, (0.25,) * 3, COLOURS[:3])


@pytest.mark.parametrize("class_specific", [False, True])
def test_coops_gradient_reaches_only_the_context_vectors(class_specific: bool) -> None:
    head = _tiny_classifier()
    spec = ContextSpec(context=4, width=16, classes=3 if class_specific else None)
    context = spec.initial(seed=0).requires_grad_(True)
    logits = head.context_logits(torch.rand(4, 3, 32, 32), context[None])
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert context.grad is not None and float(context.grad.abs().sum()) > 0
    assert all(p.grad is None for p in head.parameters())
    if class_specific:  # each class's context moves its own class's feature only
        assert context.grad.shape == (3, 4, 16)
    # the slots hold the context: other vectors give other logits, the template none of it
    other = head.context_logits(torch.rand(1, 3, 32, 32), spec.initial(seed=1)[None])
    assert other.shape == (1, 3)
    with pytest.raises(ConfigError, match="context slots"):
        head.clip.encode_text(tokenize(["red."]), context.detach())


def test_any_class_name_encodes_and_a_long_one_is_refused() -> None:
    ids = tokenize(["Ünïcode & digits 0-9", "a"])
    assert ids.shape[0] == 2 and int(ids[0].ne(0).sum()) == 22
    with pytest.raises(ConfigError, match="at most"):
        tokenize(["x" * 200])


@pytest.mark.slow
def test_coop_fits_round_trip_and_refuse_another_model(tmp_path: Path, clip_server: str) -> None:
    common = ("--model", "shapes-clip", "--data", "colours", "--epochs", "2", "--no-progress")
    for kind in ("coop", "coop-csc"):
        out = tmp_path / f"{kind}.safetensors"
        fitted = run_cli("fit", *common, "--program", kind, "--tokens", "4", "--out", str(out))
        evaluated = run_cli("eval", "--model", "shapes-clip", "--prompt", str(out), "--data",
                            "colours", "--split", "test")
        assert evaluated["accuracy"] == pytest.approx(fitted["test_accuracy"], abs=1e-4)
        prompt = load_prompt(out)
        assert prompt.program.context is not None and prompt.program.context.context == 4
        assert (prompt.program.context.classes is not None) == (kind == "coop-csc")
        assert prompt.source["template"] == "a photo of a {}."
        assert prompt.target_classes == COLOURS
        # hosted by the zero-shot server, it predicts what `reprogram apply` does
        uploaded = httpx.post(clip_server + "/v1/prompts", timeout=60, files={
            "file": (out.name, out.read_bytes(), "application/octet-stream")})
        assert uploaded.status_code == 201, uploaded.text
        images = [tmp_path / f"{i}.png" for i in range(4)]
        for path, image in zip(images, _images(4), strict=True):
            path.write_bytes(png(image))
        hosted = httpx.post(f"{clip_server}/v1/prompts/{uploaded.json()['id']}/predict",
                            timeout=60, files=[("files", (p.name, p.read_bytes(), "image/png"))
                                               for p in images])
        assert hosted.status_code == 200, hosted.text
        applied = subprocess.run([*cli_command(), "apply", "--model", "shapes-clip", "--prompt",
                                  str(out), *map(str, images)], capture_output=True, text=True,
                                 timeout=120, check=True)
        assert [p["label"] for p in hosted.json()["predictions"]] == [
            json.loads(line)["label"] for line in applied.stdout.splitlines()]
    refused = subprocess.run([*cli_command(), "eval", "--model", "default", "--prompt",
                              str(tmp_path / "coop.safetensors"), "--data", "colours"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0 and "vision-language" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_black_box_pixel_prompt_learns_through_the_zero_shot_api(clip_server: str,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "bb.safetensors"
    summary = run_cli("fit", "--endpoint", clip_server, "--data", "colours", "--budget", "4000",
                      "--seed", "0", "--out", str(out), "--no-progress", timeout=600)
    assert summary["test_accuracy"] > 1 / 6 + 0.2  # well above chance, no label map
    evaluated = run_cli("eval", "--endpoint", clip_server, "--prompt", str(out), "--data",
                        "colours", "--split", "test")
    assert evaluated["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
