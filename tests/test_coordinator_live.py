"""BlackVIP end to end: ``reprogram fit --preset blackvip --endpoint`` against a real server,
the prompt hosted and applied over HTTP, and one learned with another encoder refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prompt_support import (
    ServerProcess,
    listing,
    model_server,
    png,
    predict_probs,
    resign,
    run_cli,
    split_artifact,
    upload,
)

from reprogram.artifact import load_prompt
from reprogram.data import load_dataset
from reprogram.oracles import LocalOracle
from reprogram.zoo.registry import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("coordinator-prompts")
    proc = model_server("--prompts-dir", str(folder))
    proc.start()
    yield proc, folder
    proc.stop()


def test_blackvip_fit_over_http_is_hosted_and_predicts_as_in_process(
    server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    proc, folder = server
    out = tmp_path / "bv.safetensors"
    summary = run_cli("fit", "--endpoint", proc.url, "--data", "digits", "--preset",
                      "blackvip", "--batch-size", "32", "--budget", "5000", "--out", str(out),
                      "--no-progress")
    assert summary["queries"]["images"] <= 5000
    prompt = load_prompt(out)
    assert prompt.program.kind == "coordinator"
    assert prompt.program.coordinator is not None
    assert prompt.program.coordinator.encoder == "default"
    data = out.read_bytes()
    with httpx.Client(base_url=proc.url, timeout=60.0) as http:
        r = upload(http, data)
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        images = load_dataset("digits", seed=0).images[:12]
        probs, _ = predict_probs(http, pid, [png(im) for im in images])
        # the same prompt in this process gives the same probabilities
        oracle = LocalOracle(load_model(), output="probs", wire="uint8")
        local = prompt.build().predict_proba(images, oracle).numpy()
        np.testing.assert_allclose(probs, local, atol=2e-5)

        # a forger's file claiming another encoder: refused in words, nothing stored
        meta, tensors = split_artifact(data)
        meta["program"]["coordinator"]["encoder_sha256"] = "0" * 64
        before = listing(folder)
        bad = upload(http, resign(meta, {k: v.clone() for k, v in tensors.items()}))
        assert 400 <= bad.status_code < 500, bad.text
        assert "another encoder" in bad.json()["error"]
        assert listing(folder) == before
        # an encoder this server does not have
        meta["program"]["coordinator"]["encoder"] = str(tmp_path / "no-such-model")
        missing = upload(http, resign(meta, {k: v.clone() for k, v in tensors.items()}))
        assert 400 <= missing.status_code < 500, missing.text
        assert "error" in missing.json()
    assert torch.is_tensor(tensors["program.theta"])
