"""Tests for reprogram.zoo.loaders and modelconfig: TorchScript, ONNX, torchvision and default
models from folders with a config, and every way a config or a file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reprogram.config import recommended_config
from reprogram.data import load_digits
from reprogram.errors import EstimatorError, ModelError
from reprogram.fit import fit
from reprogram.oracles import LocalOracle
from reprogram.zoo.export import export_model, save_torchvision
from reprogram.zoo.loaders import load_path, load_repository, source_name
from reprogram.zoo.modelconfig import resize_image
from reprogram.zoo.registry import SourceModel, load_model

# exporting and tracing in torch 2.14 warns that both are deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _probs(model: SourceModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(model.module(x), dim=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, model: SourceModel) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for fmt in ("default", "torchscript", "onnx"):
        export_model(model, root / f"shapes-{fmt}", fmt)
    return root


def test_exports_load_and_match_the_safetensors_model(exports: Path, model: SourceModel) -> None:
    x = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = _probs(model, x)
    loaded = {m.meta.name: m for m in load_repository(exports)}
    assert sorted(loaded) == ["shapes-default", "shapes-onnx", "shapes-torchscript"]
    for name, m in loaded.items():
        assert m.meta.input_size == (32, 32) and m.meta.class_names == model.meta.class_names
        assert float((_probs(m, x) - want).abs().max()) < 1e-4, name
    assert loaded["shapes-onnx"].meta.platform == "onnxruntime_onnx"
    assert loaded["shapes-torchscript"].meta.platform == "pytorch_libtorch"
    assert not loaded["shapes-onnx"].differentiable and loaded["shapes-torchscript"].differentiable
    # the same files through every entry point: folder, config file, weights file, load_model
    onnx = exports / "shapes-onnx"
    for given in (onnx, onnx / "config.json", onnx / "model.onnx"):
        assert float((_probs(load_path(given), x[:5]) - want[:5]).abs().max()) < 1e-4
        assert source_name(given) == "shapes-onnx"
    assert load_model(str(onnx)).meta.weights_sha256 == loaded["shapes-onnx"].meta.weights_sha256


def test_onnx_has_no_autograd_and_autograd_on_it_is_a_one_line_error(exports: Path) -> None:
    oracle = LocalOracle(load_path(exports / "shapes-onnx"))
    assert not oracle.differentiable
    cfg = recommended_config("autograd", budget=5000)
    with pytest.raises(EstimatorError, match="ONNX") as info:
        fit(cfg, oracle, load_digits())
    assert "'rgf' or 'spsa'" in str(info.value) and "\n" not in str(info.value)


def test_a_graph_with_a_fixed_batch_is_fed_in_chunks(tmp_path: Path, model: SourceModel) -> None:
    folder = tmp_path / "fixed"
    folder.mkdir()
    torch.onnx.export(model.module.eval(), (torch.rand(4, 3, 32, 32),),
                      str(folder / "model.onnx"), input_names=["image"], dynamo=False)
    (folder / "config.json").write_text(json.dumps({"format": "onnx", "max_batch": 4}))
    loaded = load_path(folder)
    assert loaded.meta.input_size == (32, 32)  # read from the graph's static shape
    assert loaded.meta.class_names[0] == "class_0" and loaded.meta.max_batch == 4
    x = torch.rand(10, 3, 32, 32)
    assert float((_probs(loaded, x) - _probs(model, x)).abs().max()) < 1e-4
    assert LocalOracle(loaded, max_batch=256).max_batch == 4


class _ChannelsLastSoftmax(nn.Module):
    """The default network behind an NHWC input, ending in softmax."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x.permute(0, 3, 1, 2)), dim=1)


def test_nhwc_layout_and_probability_outputs(tmp_path: Path, model: SourceModel) -> None:
    folder = tmp_path / "nhwc"
    folder.mkdir()
    net = torch.jit.trace(_ChannelsLastSoftmax(model.module).eval(), torch.rand(2, 32, 32, 3))
    net.save(str(folder / "model.pt"))
    (folder / "names.txt").write_text("\n".join(model.meta.class_names) + "\n")
    (folder / "config.json").write_text(json.dumps(
        {"format": "torchscript", "input_size": 32, "layout": "NHWC", "output": "probs",
         "class_names": "names.txt", "resize": "letterbox"}))
    loaded = load_path(folder)
    x = torch.rand(6, 3, 32, 32)
    assert float((_probs(loaded, x) - _probs(model, x)).abs().max()) < 1e-4
    assert loaded.meta.class_names == model.meta.class_names
    assert loaded.meta.resize == "letterbox"


def test_torchvision_config_with_a_random_state_dict(tmp_path: Path) -> None:
    save_torchvision("resnet18", tmp_path / "r18", num_classes=7, input_size=64, max_batch=8)
    loaded = load_path(tmp_path / "r18")
    assert loaded.meta.input_size == (64, 64) and loaded.meta.num_classes == 7
    assert loaded.meta.architecture == "torchvision:resnet18" and loaded.meta.max_batch == 8
    assert loaded.meta.resize == "crop" and loaded.meta.mean == (0.485, 0.456, 0.406)
    assert loaded.differentiable


def test_a_weights_enum_is_never_downloaded(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match="nothing is downloaded"):
        load_model("torchvision:resnet18", "IMAGENET1K_V1")


def _folder(tmp_path: Path, config: object, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("config", "match"), [
    ({"format": "caffe"}, r"expected 'format' one of .*got 'caffe'"),
    ({"format": "onnx", "input_sise": 32}, r"unknown \['input_sise'\]"),
    ({"format": "torchscript"}, "expected 'input_size'"),
    ({"format": "torchvision"}, "expected 'architecture'"),
    ({"format": "onnx", "input_size": [32, 0]}, "positive integer"),
    ({"format": "onnx", "std": [1, 0, 1]}, "3 positive numbers"),
    ({"format": "onnx", "layout": "CHW"}, "'layout' one of"),
    ({"format": "onnx", "class_names": "missing.txt"}, "cannot read class names"),
    ({"format": "onnx", "name": "a b"}, "expected 'name'"),
    ({"format": "onnx"}, r"model.onnx'? named by .*no such file"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_configs_are_one_line_errors_naming_the_file(tmp_path: Path, config: object,
                                                        match: str) -> None:
    folder = _folder(tmp_path, config)
    with pytest.raises(ModelError, match=match) as info:
        load_path(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_a_config_that_lies_about_the_input_size_fails_at_load(tmp_path: Path,
                                                                model: SourceModel,
                                                                exports: Path) -> None:
    # a static ONNX graph: the config's size is checked against the graph's
    folder = tmp_path / "static"
    folder.mkdir()
    torch.onnx.export(model.module.eval(), (torch.rand(1, 3, 32, 32),),
                      str(folder / "model.onnx"), dynamo=False)
    (folder / "config.json").write_text(json.dumps({"format": "onnx", "input_size": 224}))
    with pytest.raises(ModelError, match=r"says input_size \[224, 224\].*takes \[32, 32\]"):
        load_path(folder)
    # a TorchScript network that only runs at its own size: the load-time forward pass fails
    flat = tmp_path / "flat"
    flat.mkdir()
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    torch.jit.trace(net, torch.rand(1, 3, 32, 32)).save(str(flat / "model.pt"))
    (flat / "config.json").write_text(json.dumps({"format": "torchscript", "input_size": 64}))
    with pytest.raises(ModelError, match=r"does not run on the input size \[64, 64\]") as info:
        load_path(flat)
    assert "model.pt" in str(info.value) and "\n" not in str(info.value)
    # the class count is checked against the output too
    bad = json.loads((exports / "shapes-torchscript" / "config.json").read_text())
    folder = _folder(tmp_path, {**bad, "class_names": ["a", "b"]}, "names")
    (folder / "model.pt").write_bytes((exports / "shapes-torchscript" / "model.pt").read_bytes())
    with pytest.raises(ModelError, match=r"names 2 classes, but .* returns 10 scores"):
        load_path(folder)


def test_broken_weights_and_a_broken_repository_name_the_model_and_file(tmp_path: Path) -> None:
    _folder(tmp_path, {"format": "default"}, "good")
    broken = _folder(tmp_path, {"format": "onnx", "input_size": 32}, "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelError, match=r"model 'broken' in repository .*cannot read ONNX model"
                                         r" .*model.onnx") as info:
        load_repository(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="one sub-folder per model"):
        load_repository(tmp_path / "good")
    with pytest.raises(ModelError, match="expected a model config"):
        load_path(tmp_path)  # a folder without config.json


def test_resize_policies() -> None:
    img = Image.fromarray(np.full((100, 200, 3), 200, dtype=np.uint8))
    assert resize_image(img, (50, 50)).size == (50, 50)  # stretch
    crop = resize_image(img, (224, 224), "crop")
    assert crop.size == (224, 224) and np.asarray(crop).min() == 200  # no bars
    box = np.asarray(resize_image(img, (224, 224), "letterbox"))
    assert box.shape == (224, 224, 3)
    assert box[0].max() == 0 and box[112].min() == 200  # black bars above and below
