"""Visual Prompt Tuning: token prompts on the zoo's ViT and torchvision's, fitted, saved,
checked against the model they load on, and hosted by a real ``reprogram-server``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prompt_support import ServerProcess, model_server, png, predict_probs, run_cli, upload
from torchvision.models import VisionTransformer

from reprogram.artifact import check_compatible, load_prompt
from reprogram.config import FitConfig
from reprogram.data import load_dataset
from reprogram.errors import ArtifactError, ConfigError
from reprogram.fit import fit
from reprogram.oracles import LocalOracle
from reprogram.tokens import TokenSpec, vit_adapter
from reprogram.zoo.net import Normalize
from reprogram.zoo.registry import ModelMeta, SourceModel, freeze, load_model
from reprogram.zoo.vit import ShapesViT

ROOT = Path(__file__).resolve().parents[1]


def _tiny_torchvision() -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=8, mlp_dim=16, num_classes=3)
    return freeze(torch.nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), net))


def test_torchvision_adapter_matches_the_model_and_places_tokens() -> None:
    module = _tiny_torchvision()
    adapter = vit_adapter(module)
    assert (adapter.layers, adapter.width, adapter.patch) == (2, 8, 8)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(adapter.head(adapter.features(x, None)), module(x))
    # zero tokens are the model itself; shallow and deep tokens change the answer
    torch.testing.assert_close(adapter.features(x, torch.zeros(0, 8)), adapter.features(x, None))
    assert not torch.allclose(adapter.features(x, torch.randn(3, 8)), adapter.features(x, None))
    assert not torch.allclose(adapter.features(x, torch.randn(2, 3, 8)),
                              adapter.features(x, None))


def test_deep_tokens_replace_the_previous_layers_tokens() -> None:
    """A deep prompt whose later layers repeat what a shallow prompt carries would differ:
    the deep one overwrites the tokens' positions before every block (VPT Sec. 3.2)."""
    torch.manual_seed(0)
    m = ShapesViT(num_classes=3, width=8, image_size=8, patch=4, depth=2, heads=2).eval()
    x = torch.rand(2, 3, 8, 8)
    shallow = torch.randn(3, 8)
    deep = torch.stack([shallow, torch.randn(3, 8)])
    h = m.embed(x)
    h = torch.cat([h[:, :1], deep[0].expand(2, -1, -1), h[:, 1:]], dim=1)
    h = m.blocks[0](h)
    h = torch.cat([h[:, :1], deep[1].expand(2, -1, -1), h[:, 4:]], dim=1)
    h = m.blocks[1](h)
    torch.testing.assert_close(m.forward_tokens(x, deep), m.norm(h[:, 0]))
    assert not torch.allclose(m.forward_tokens(x, shallow), m.forward_tokens(x, deep))


def test_token_spec_round_trips_and_is_checked() -> None:
    spec = TokenSpec(depth="deep", tokens=5, layers=6, width=64, patch=4)
    assert TokenSpec.from_dict(spec.to_dict()) == spec
    assert spec.shape == (6, 5, 64) and spec.initial(0).shape == (6, 5, 64)
    bound = (6 / (3 * 16 + 64)) ** 0.5
    assert float(spec.initial(0).abs().max()) <= bound
    with pytest.raises(ConfigError, match="token depth"):
        TokenSpec(depth="middle", tokens=5, layers=6, width=64, patch=4)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vpt_fit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vpt") / "vpt.safetensors"
    run_cli("fit", "--model", "shapes-vit", "--data", "digits", "--program", "vpt-deep",
            "--tokens", "2", "--budget", "6000", "--batch-size", "16", "--seed", "0",
            "--no-progress", "--out", str(out), timeout=300)
    return out


def test_a_vpt_fit_learns_and_its_artifact_round_trips(vpt_fit: Path) -> None:
    prompt = load_prompt(vpt_fit)
    assert prompt.program.kind == "vpt-deep" and prompt.labelmap.kind == "head"
    assert prompt.program.tokens == TokenSpec(depth="deep", tokens=2, layers=6, width=64,
                                              patch=4)
    assert prompt.labelmap.num_source == 64
    assert prompt.metrics["val_accuracy"] > 0.3  # chance is 0.1
    result = run_cli("eval", "--model", "shapes-vit", "--prompt", str(vpt_fit), "--data",
                     "digits")
    assert abs(result["accuracy"] - prompt.metrics["test_accuracy"]) < 1e-4


def test_a_mismatched_vit_or_a_cnn_is_refused(vpt_fit: Path) -> None:
    prompt = load_prompt(vpt_fit)
    torch.manual_seed(0)
    shallower = ShapesViT(depth=4)
    meta = load_model("shapes-vit").meta
    other = SourceModel(freeze(torch.nn.Sequential(Normalize(meta.mean, meta.std), shallower)),
                        ModelMeta(**{**meta.__dict__, "weights_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match=r"layers 6 \(the model has 4\)"):
        check_compatible(prompt, (32, 32), 10, oracle=LocalOracle(other))
    proc = subprocess.run([sys.executable, "-m", "reprogram.cli", "eval", "--model", "default",
                           "--prompt", str(vpt_fit), "--data", "digits"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "expected a vision transformer for token prompts" in proc.stderr


def test_fit_over_an_endpoint_with_tokens_is_a_one_line_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "reprogram.cli", "fit", "--endpoint",
                           "http://127.0.0.1:9", "--data", "digits", "--program", "vpt-shallow",
                           "--budget", "1000", "--out", "/tmp/never.safetensors"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "the tokens enter the model's layers" in proc.stderr
    assert "--model MODEL" in proc.stderr


def test_head_needs_a_token_program() -> None:
    with pytest.raises(ConfigError, match="token program"):
        FitConfig(program="full", labelmap="head", budget=1000)


def test_shallow_tokens_and_the_source_map_learn_in_process() -> None:
    data = load_dataset("digits")
    cfg = FitConfig(program="vpt-shallow", labelmap="linear", tokens=3, lr=0.05,
                    budget=4000, batch_size=16)
    result = fit(cfg, LocalOracle(load_model("shapes-vit")), data)
    assert result.model.program.theta.shape == (3, 64)
    assert result.best_val_accuracy > 0.15


@pytest.fixture(scope="module")
def vit_server() -> Iterator[ServerProcess]:
    proc = model_server("--model", "shapes-vit")
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.slow
def test_hosted_vpt_prediction_equals_reprogram_eval(vit_server: ServerProcess,
                                                     vpt_fit: Path) -> None:
    prompt = load_prompt(vpt_fit)
    from reprogram.commands import evaluation_split

    test = evaluation_split(prompt, load_dataset("digits"), "test")
    with httpx.Client(base_url=vit_server.url, timeout=60.0) as http:
        r = upload(http, vpt_fit.read_bytes())
        assert r.status_code in (200, 201), r.text
        pid = r.json()["id"]
        probs, _ = predict_probs(http, pid, [png(img) for img in test.images[:64]])
    expected = prompt.build().predict_proba(test.images[:64],
                                            LocalOracle(load_model("shapes-vit"))).numpy()
    assert np.abs(expected - probs).max() < 1e-5
    local = run_cli("eval", "--model", "shapes-vit", "--prompt", str(vpt_fit), "--data",
                    "digits")
    assert abs(local["accuracy"] - prompt.metrics["test_accuracy"]) < 1e-4
