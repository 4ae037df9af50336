"""One model loader for the server and the local oracle: model configs, files and repositories.

:func:`load_path` loads a model from a folder holding a ``config.json``, from a config file, or
from a weights file with a config beside it (``NAME.json`` next to ``NAME.onnx``);
:func:`load_repository` loads every model of a repository folder laid out as Triton lays one
out (one sub-folder per model, each with its config and weights). Formats (see
:mod:`reprogram.zoo.modelconfig`): the shipped default model, torchvision architectures
(state dicts; weights enums only from torch's local hub cache: nothing is downloaded),
TorchScript archives (``torch.jit.load``) and ONNX graphs (onnxruntime on the CPU; such a model
has no autograd, so ``SourceModel.differentiable`` is False).

Every model is checked at load with one forward pass of a grey image at its configured input
size: a broken file, a config that lies about the input size or the class count, fails here
with a :class:`ModelError` naming the model and the file, not at the first request.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reprogram.errors import ModelError
from reprogram.zoo.modelconfig import CONFIG_NAME, ModelConfig, read_model_config
from reprogram.zoo.net import Normalize
from reprogram.zoo.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelMeta,
    SourceModel,
    freeze,
    load_default,
    load_state,
    sha256_file,
)

__all__ = ["find_config", "load_config", "load_path", "load_repository", "load_torchvision",
           "repository_names", "source_name"]

log = logging.getLogger(__name__)


class ToChannelsLast(nn.Module):
    """``[N, 3, H, W]`` -> ``[N, H, W, 3]`` for networks that take NHWC input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous()


class LogOf(nn.Module):
    """Logits from probabilities (``log p``; softmax of it gives ``p`` back)."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.log(p.clamp_min(1e-30))


class OnnxNet(nn.Module):
    """An onnxruntime session as a module (CPU, float32, no autograd).

    A graph exported with a fixed batch size gets its input in chunks of that size, the last
    one padded with zeros and the padding dropped from the output.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelError("ONNX models need onnxruntime: pip install onnxruntime") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for any broken file
            raise ModelError(f"cannot read ONNX model {str(path)!r}: {_one_line(exc)}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)":
            raise ModelError(f"expected an ONNX graph with one float input in {str(path)!r},"
                             f" got {[(i.name, i.type) for i in inputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.shape: list[int | str | None] = list(inputs[0].shape)
        self.batch = self.shape[0] if isinstance(self.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).numpy()
        n, b = arr.shape[0], self.batch or arr.shape[0]
        parts = []
        for i in range(0, n, b):
            chunk = arr[i : i + b]
            if chunk.shape[0] < b:
                pad = np.zeros((b - chunk.shape[0], *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            parts.append(out[: min(b, n - i)])
        return torch.from_numpy(np.concatenate(parts).astype(np.float32)).to(x.device)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file(cfg: ModelConfig) -> Path:
    if cfg.weights is None or not cfg.weights.is_file():
        raise ModelError(f"expected the weights file {str(cfg.weights)!r} named by"
                         f" {str(cfg.path)!r}, got no such file")
    return cfg.weights


def load_torchvision(arch: str, weights: str | Path | None, *,
                     class_names: tuple[str, ...] | None = None,
                     input_size: tuple[int, int] = (224, 224),
                     mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> tuple[nn.Module, ModelMeta]:
    """A torchvision architecture (bare network, metadata) from a state-dict file, or from a
    weights enum name (``IMAGENET1K_V1``) whose file is already in torch's hub cache."""
    import torchvision.models as tvm

    if arch not in tvm.list_models(module=tvm):
        raise ModelError(f"expected a torchvision classification model name, got {arch!r}")
    if weights is None:
        raise ModelError(f"torchvision:{arch} needs --weights FILE (a state dict) or an enum name")
    path = Path(weights)
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
        state = load_state(path)
        digest = sha256_file(path)
    else:
        state, names, digest = _cached_enum(tvm, arch, str(weights))
        class_names = class_names or names
    head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    num_classes = int(head[-1].shape[0]) if head else 1000
    names = class_names or tuple(f"class_{i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise ModelError(f"expected {num_classes} class names for {str(path)!r}, got {len(names)}")
    net = tvm.get_model(arch, weights=None, num_classes=num_classes)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"weights {str(weights)!r} do not fit torchvision {arch}:"
                         f" {_one_line(exc)}") from exc
    meta = ModelMeta(name=f"torchvision-{arch}", architecture=f"torchvision:{arch}",
                     input_size=input_size, mean=tuple(mean), std=tuple(std),  # type: ignore[arg-type]
                     class_names=names, weights_sha256=digest, resize="crop")
    return net, meta


def _cached_enum(tvm: object, arch: str,
                 name: str) -> tuple[dict[str, torch.Tensor], tuple[str, ...], str]:
    enum = tvm.get_model_weights(arch)  # type: ignore[attr-defined]
    try:
        member = enum[name]
    except KeyError:
        raise ModelError(f"expected a state-dict file or one of {[w.name for w in enum]},"
                         f" got {name!r}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
    if not cached.is_file():
        raise ModelError(f"weights {arch}:{name} are not on this machine (expected"
                         f" {cached!s}); nothing is downloaded: save a state dict and pass"
                         " its file")
    return load_state(cached), tuple(member.meta["categories"]), sha256_file(cached)


def _network(cfg: ModelConfig) -> tuple[nn.Module, ModelMeta, bool]:
    """The bare network, its metadata so far, and whether it has autograd."""
    if cfg.format == "torchvision":
        given = cfg.weights
        enum = given is not None and not given.exists() and not given.suffix
        net, meta = load_torchvision(
            str(cfg.architecture), given.name if enum and given else _file(cfg),
            class_names=cfg.class_names,
            input_size=cfg.input_size or (224, 224), mean=cfg.mean or IMAGENET_MEAN,
            std=cfg.std or IMAGENET_STD)
        return net, meta, True
    path = _file(cfg)
    size = cfg.input_size or (0, 0)
    differentiable = True
    if cfg.format == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError, ValueError ... on junk
            raise ModelError(f"cannot read TorchScript archive {str(path)!r}:"
                             f" {_one_line(exc)}") from exc
        platform = "pytorch_libtorch"
    else:
        net = OnnxNet(path)
        size = _onnx_size(net, cfg, path)
        platform, differentiable = "onnxruntime_onnx", False
    meta = ModelMeta(name=path.stem, architecture=f"{cfg.format}:{path.name}", input_size=size,
                     mean=cfg.mean or (0.0, 0.0, 0.0), std=cfg.std or (1.0, 1.0, 1.0),
                     class_names=cfg.class_names or (), weights_sha256=sha256_file(path),
                     platform=platform)
    return net, meta, differentiable


def _onnx_size(net: OnnxNet, cfg: ModelConfig, path: Path) -> tuple[int, int]:
    """The input size: the config's, checked against a static graph shape, or the graph's."""
    dims = net.shape[1:3] if cfg.layout == "NHWC" else net.shape[2:4]
    static = tuple(d for d in dims if isinstance(d, int))
    if cfg.input_size is not None:
        if len(static) == 2 and static != cfg.input_size:
            raise ModelError(f"model config {str(cfg.path)!r} says input_size"
                             f" {list(cfg.input_size)}, but {str(path)!r} takes"
                             f" {list(static)} (input shape {net.shape})")
        return cfg.input_size
    if len(static) != 2:
        raise ModelError(f"expected 'input_size' in {str(cfg.path)!r}: {str(path)!r} has a"
                         f" dynamic input shape {net.shape}")
    return (int(static[0]), int(static[1]))


def _wrap(net: nn.Module, cfg: ModelConfig, meta: ModelMeta) -> nn.Module:
    layers: list[nn.Module] = []
    if cfg.mean is not None or cfg.std is not None or cfg.format == "torchvision":
        layers.append(Normalize(meta.mean, meta.std))
    if cfg.layout == "NHWC":
        layers.append(ToChannelsLast())
    layers.append(net)
    if cfg.output == "probs":
        layers.append(LogOf())
    return freeze(nn.Sequential(*layers))


def _probe(module: nn.Module, meta: ModelMeta, cfg: ModelConfig, path: Path) -> int:
    """Run one grey image at the configured size; the output width (the class count)."""
    h, w = meta.input_size
    try:
        with torch.inference_mode():
            out = module(torch.full((1, 3, h, w), 0.5))
    except Exception as exc:  # whatever the network raises on an input it does not take
        raise ModelError(f"{str(path)!r} does not run on the input size [{h}, {w}] that"
                         f" {str(cfg.path)!r} gives: {_one_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"expected {str(path)!r} to return scores [N, K] for input"
                         f" [1, 3, {h}, {w}], got {shape}")
    if not bool(torch.isfinite(out).all()):
        raise ModelError(f"expected finite scores from {str(path)!r}, got NaN or Inf")
    k = int(out.shape[1])
    if meta.class_names and len(meta.class_names) != k:
        raise ModelError(f"model config {str(cfg.path)!r} names {len(meta.class_names)}"
                         f" classes, but {str(path)!r} returns {k} scores")
    return k


def load_config(cfg: ModelConfig, name: str | None = None) -> SourceModel:
    """Load the model a config describes, served as ``cfg.name``, else ``name``."""
    if cfg.format == "default":
        weights = cfg.weights if cfg.weights is not None else None
        meta_path = weights.with_suffix(".json") if weights is not None else None
        base = load_default(weights, meta_path)
        meta = _finish(base.meta, cfg, cfg.name or name or "default", len(base.meta.class_names))
        return SourceModel(base.module, meta)
    net, meta, differentiable = _network(cfg)
    module = _wrap(net, cfg, meta)
    path = cfg.weights or cfg.path
    k = _probe(module, meta, cfg, path)
    meta = _finish(meta, cfg, cfg.name or name or meta.name, k)
    log.info("loaded %s model %r from %s (%dx%d, %d classes)", cfg.format, meta.name, path,
             *meta.input_size, k)
    return SourceModel(module, meta, differentiable=differentiable)


def _finish(meta: ModelMeta, cfg: ModelConfig, name: str, k: int) -> ModelMeta:
    from dataclasses import replace

    names = meta.class_names or tuple(f"class_{i}" for i in range(k))
    return replace(meta, name=name, class_names=names, max_batch=cfg.max_batch,
                   resize=cfg.resize, resize_size=cfg.resize_size)


def find_config(path: Path) -> Path:
    """The config of a model given as a folder, a config file or a weights file."""
    if path.is_dir():
        candidate = path / CONFIG_NAME
    elif path.suffix == ".json":
        candidate = path
    else:
        candidate = path.with_suffix(".json")
        if not candidate.is_file():
            candidate = path.parent / CONFIG_NAME
    if not candidate.is_file():
        raise ModelError(f"expected a model config at {str(candidate)!r} for {str(path)!r},"
                         " got none (see the README: a JSON file with format, input_size ...)")
    return candidate


def load_path(path: str | Path) -> SourceModel:
    """Load a model from a folder, a config file, or a weights file with its config."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"expected a model folder, config or weights file, got {str(path)!r}:"
                         " no such file")
    config = find_config(path)
    default_name = config.parent.name if config.name == CONFIG_NAME else config.stem
    cfg = read_model_config(config)
    if cfg.weights is None and path.is_file() and path.suffix != ".json":
        from dataclasses import replace

        cfg = replace(cfg, weights=path)
    return load_config(cfg, default_name)


def source_name(path: str | Path) -> str:
    """The name a model path is served under, read from its config without loading it: the
    config's ``name``, else the folder's (``config.json``) or the config file's stem."""
    try:
        config = find_config(Path(path))
        name = read_model_config(config).name
    except ModelError:
        return Path(path).stem or "model"  # the load will say what is wrong
    return name or (config.parent.name if config.name == CONFIG_NAME else config.stem)


def _folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ModelError(f"expected a model repository folder, got {str(root)!r}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ModelError(f"expected one sub-folder per model in {str(root)!r}, got none")
    return folders


def repository_names(root: str | Path) -> list[str]:
    """The names a repository's models are served under (read without loading them)."""
    try:
        return [source_name(folder) for folder in _folders(Path(root))]
    except ModelError:
        return [Path(root).name or "models"]


def load_repository(root: str | Path) -> list[SourceModel]:
    """Every model of a repository folder (one sub-folder per model with a ``config.json``),
    in name order; a broken model raises :class:`ModelError` naming the model and the file."""
    root = Path(root)
    models: list[SourceModel] = []
    for folder in _folders(root):
        try:
            models.append(load_path(folder))
        except ModelError as exc:
            raise ModelError(f"model {folder.name!r} in repository {str(root)!r}: {exc}") from None
    names = [m.meta.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ModelError(f"expected distinct model names in {str(root)!r}, got {dup} twice")
    return models
