"""Tests for reprogram.zoo: the shipped default model, its reproduction script, the registry."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from reprogram.errors import ModelError
from reprogram.zoo.registry import ZOO, default_paths, load_default, load_model, load_zoo, zoo_paths
from reprogram.zoo.shapes import SHAPE_CLASSES, generate_shapes
from reprogram.zoo.train import train

ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record() -> dict[str, object]:
    record: dict[str, object] = json.loads(default_paths()[1].read_text())
    return record


# ------------------------------------------------------------------ the shipped model
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_evaluate_reports_heldout_accuracy_and_matching_sha256(name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "reprogram.zoo.train", "--evaluate",
                           "--model", name],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["heldout_accuracy"] >= 0.95
    assert result["heldout_images"] == 2000
    weights, meta = zoo_paths(name)
    recorded = json.loads(meta.read_text())["weights_sha256"]
    assert result["weights_sha256"] == recorded == _sha256(weights)
    assert result["sha256_matches"] is True
    assert result["heldout_accuracy"] == pytest.approx(result["recorded_heldout_accuracy"])
    assert weights.stat().st_size < 5 * 2**20


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-vit"])
def test_retrain_of_another_zoo_model_is_reproducible_and_loads(name: str,
                                                                 tmp_path: Path) -> None:
    kwargs: dict[str, int] = {"n_train": 128, "n_val": 20, "n_heldout": 20, "batch": 64}
    record = train(tmp_path / "a", epochs=1, name=name, **kwargs)
    again = train(tmp_path / "b", epochs=1, name=name, **kwargs)
    assert again["weights_sha256"] == record["weights_sha256"]  # the recipe's seed
    weights, meta = (tmp_path / "a" / f for f in ZOO[name])
    model = load_zoo(name, weights, meta)
    assert model.meta.class_names == SHAPE_CLASSES
    assert model.module(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------ the source task
def test_shapes_are_deterministic_balanced_uint8_with_ten_classes() -> None:
    x, y = generate_shapes(60, seed=7)
    x2, y2 = generate_shapes(60, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = generate_shapes(60, seed=8)
    assert not torch.equal(x, x3)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (60, 3, 32, 32)
    assert y.dtype == torch.int64 and tuple(y.shape) == (60,)
    assert len(SHAPE_CLASSES) == 10 == len(set(SHAPE_CLASSES))
    assert torch.bincount(y, minlength=10).tolist() == [6] * 10
    assert int(x.float().std()) > 10  # real pictures, not blank frames
    big, _ = generate_shapes(4, seed=0, size=48)
    assert tuple(big.shape) == (4, 3, 48, 48)


# ------------------------------------------------------------------ registry: default
def test_registry_loads_default_with_its_metadata() -> None:
    model = load_model("default")
    meta, record = model.meta, _record()
    assert meta.class_names == SHAPE_CLASSES
    assert list(meta.class_names) == record["class_names"]
    assert meta.input_size == (32, 32)
    assert list(meta.mean) == record["mean"] and list(meta.std) == record["std"]
    assert len(meta.mean) == len(meta.std) == 3
    assert meta.weights_sha256 == record["weights_sha256"]
    assert meta.fingerprint()["num_classes"] == 10
    assert not any(p.requires_grad for p in model.module.parameters())
    x, y = generate_shapes(20, seed=11)
    with torch.no_grad():
        logits = model.module(x.float() / 255.0)
    assert tuple(logits.shape) == (20, 10)
    assert float((logits.argmax(1) == y).float().mean()) >= 0.9


def test_registry_rejects_unknown_missing_and_tampered(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"got .nope. \(no such file\)"):
        load_model("nope")
    weights, meta = default_paths()
    with pytest.raises(ModelError, match="no file"):
        load_default(weights=tmp_path / "missing.safetensors", meta_path=meta)
    with pytest.raises(ModelError, match="metadata"):
        load_default(weights=weights, meta_path=tmp_path / "missing.json")
    tampered = tmp_path / "default.safetensors"
    shutil.copyfile(weights, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_default(weights=tampered, meta_path=meta)
    assert isinstance(ModelError("x"), ValueError)


# ------------------------------------------------------------------ registry: torchvision
def test_torchvision_architecture_with_a_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = load_model("torchvision:resnet18", str(path))
    assert model.meta.num_classes == 3 and len(model.meta.class_names) == 3
    assert model.meta.input_size == (224, 224)
    assert model.meta.weights_sha256 == _sha256(path)
    net.eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = model.module(x)
        mean = torch.tensor(model.meta.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.meta.std).view(1, 3, 1, 1)
        ref = net((x - mean) / std)
    assert tuple(out.shape) == (1, 3)
    assert torch.allclose(out, ref, atol=1e-5)  # the file's weights, normalization inside


def test_torchvision_wrong_shape_state_dict_is_a_model_error(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelError, match="do not fit"):
        load_model("torchvision:resnet18", str(path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state dict at all")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model("torchvision:resnet18", str(junk))
    with pytest.raises(ModelError, match="classification model name"):
        load_model("torchvision:no_such_net", str(path))


# ------------------------------------------------------------------ the training script
def test_train_end_to_end_on_a_tiny_set_is_reproducible(tmp_path: Path) -> None:
    kwargs: dict[str, int] = {"n_train": 128, "n_val": 20, "n_heldout": 20, "batch": 64}
    record = train(tmp_path / "a", epochs=1, seed=0, **kwargs)
    weights, meta = tmp_path / "a" / "default.safetensors", tmp_path / "a" / "default.json"
    assert record["weights_sha256"] == _sha256(weights)
    assert json.loads(meta.read_text())["weights_sha256"] == record["weights_sha256"]
    assert 0.0 <= float(str(record["heldout_accuracy"])) <= 1.0
    model = load_default(weights=weights, meta_path=meta)
    assert model.meta.class_names == SHAPE_CLASSES
    again = train(tmp_path / "b", epochs=1, seed=0, **kwargs)
    assert again["weights_sha256"] == record["weights_sha256"]  # fixed seed, same weights
