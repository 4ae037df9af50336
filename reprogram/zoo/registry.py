"""Source-model registry: the shipped zoo models (``default``, and ``shapes-resnet``: another
architecture trained on the same task, for transfer priors) and torchvision architectures.

Every model is returned as a :class:`SourceModel`: a frozen ``nn.Module`` that takes images in
[0, 1] (``[N, 3, H, W]``, normalization inside) and returns logits, together with the
metadata that travels with it (input size, mean/std, class names, weights fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from reprogram.errors import ModelError
from reprogram.zoo.net import ARCHITECTURES, Normalize

DEFAULT_WEIGHTS = "default.safetensors"
DEFAULT_META = "default.json"
# the models shipped in the package: name -> (weights, metadata) file names
ZOO = {"default": (DEFAULT_WEIGHTS, DEFAULT_META),
       "shapes-resnet": ("shapes-resnet.safetensors", "shapes-resnet.json"),
       "shapes-vit": ("shapes-vit.safetensors", "shapes-vit.json"),
       "shapes-clip": ("shapes-clip.safetensors", "shapes-clip.json")}


@dataclass(frozen=True, kw_only=True)
class ModelMeta:
    """What a client needs to know about a source model."""

    name: str
    architecture: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    weights_sha256: str
    extra: dict[str, object] = field(default_factory=dict)
    platform: str = "pytorch"  # V2 metadata: pytorch, pytorch_libtorch, onnxruntime_onnx
    max_batch: int | None = None  # the most images per forward pass and request (None: any)
    resize: str = "stretch"  # how /v1 uploads are fitted to input_size (see modelconfig)
    resize_size: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> dict[str, object]:
        """The identity of the model, as recorded in prompt artifacts."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "weights_sha256": self.weights_sha256,
            **({"template": self.extra["template"]} if self.extra.get("zero_shot") else {}),
        }


@dataclass(frozen=True)
class SourceModel:
    """A frozen classifier (inputs in [0, 1], logits out) with its metadata.

    ``differentiable`` is False where the module runs outside torch's autograd (ONNX)."""

    module: nn.Module
    meta: ModelMeta
    differentiable: bool = True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _wrap(net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    return freeze(nn.Sequential(Normalize(mean, std), net))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"expected a weights file, got {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"cannot read weights {str(path)!r}: {exc}") from exc
    except Exception as exc:  # torch's unpickler raises KeyError, EOFError, ... on junk files
        raise ModelError(f"cannot read weights {str(path)!r}: expected a state dict saved by "
                         f"torch.save or safetensors, got {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"expected a state dict in {str(path)!r}, got {type(state).__name__}")
    return state


def zoo_paths(name: str = "default") -> tuple[Path, Path]:
    """Paths of a shipped zoo model's weights and metadata inside the package."""
    root = resources.files("reprogram.zoo")
    weights, meta = ZOO[name]
    return Path(str(root / weights)), Path(str(root / meta))


def default_paths() -> tuple[Path, Path]:
    """Paths of the shipped default weights and metadata inside the package."""
    return zoo_paths("default")


def load_zoo(name: str = "default", weights: Path | None = None,
             meta_path: Path | None = None) -> SourceModel:
    """Load a shipped zoo model, checking its sha256 against the metadata."""
    dw, dm = zoo_paths(name)
    weights = weights or dw
    meta_path = meta_path or dm
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model metadata {str(meta_path)!r}: {exc}") from exc
    digest = sha256_file(weights) if weights.is_file() else ""
    if digest != record["weights_sha256"]:
        raise ModelError(
            f"expected weights with sha256 {record['weights_sha256']}, got {digest or 'no file'}"
            f" at {str(weights)!r}; reinstall the package or run "
            f"`python -m reprogram.zoo.train --model {name}`"
        )
    arch = str(record.get("architecture", "ShapesNet"))
    if arch == "ShapesCLIP":
        return _load_clip(record, weights, digest)
    if arch not in ARCHITECTURES:
        raise ModelError(f"expected an architecture among {sorted(ARCHITECTURES)} in "
                         f"{str(meta_path)!r}, got {arch!r}")
    net = ARCHITECTURES[arch](num_classes=len(record["class_names"]), width=int(record["width"]))
    net.load_state_dict(load_state(weights))
    meta = ModelMeta(
        name=str(record.get("name", name)),
        architecture=f"{arch}(width={record['width']})",
        input_size=(int(record["input_size"][0]), int(record["input_size"][1])),
        mean=tuple(record["mean"]),
        std=tuple(record["std"]),
        class_names=tuple(record["class_names"]),
        weights_sha256=digest,
        extra={"heldout_accuracy": record.get("heldout_accuracy")},
    )
    return SourceModel(_wrap(net, meta.mean, meta.std), meta)


def _load_clip(record: dict[str, object], weights: Path, digest: str) -> SourceModel:
    """``shapes-clip`` as a zero-shot classifier over its shape names with its template
    (:func:`reprogram.vlm.with_classes` gives it other classes)."""
    from reprogram.vlm import ZeroShotClassifier
    from reprogram.zoo.clip import ShapesCLIP

    clip = ShapesCLIP(int(record["width"]), int(record["text_width"]),  # type: ignore[call-overload]
                      int(record["embed"]))  # type: ignore[call-overload]
    clip.load_state_dict(load_state(weights))
    names = tuple(str(n) for n in record["class_names"])  # type: ignore[attr-defined]
    mean: tuple[float, ...] = tuple(record["mean"])  # type: ignore[arg-type]
    std: tuple[float, ...] = tuple(record["std"])  # type: ignore[arg-type]
    template = str(record["template"])
    meta = ModelMeta(
        name=str(record["name"]), architecture="ShapesCLIP",
        input_size=tuple(record["input_size"]),  # type: ignore[arg-type]
        mean=mean, std=std, class_names=names,  # type: ignore[arg-type]
        weights_sha256=digest,
        extra={"heldout_accuracy": record.get("heldout_accuracy"), "zero_shot": True,
               "template": template})
    return SourceModel(freeze(ZeroShotClassifier(clip, mean, std, names, template)), meta)


def load_default(weights: Path | None = None, meta_path: Path | None = None) -> SourceModel:
    """Load the shipped shapes classifier, checking its sha256 against the metadata."""
    return load_zoo("default", weights, meta_path)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_torchvision(
    arch: str,
    weights: str | None,
    class_names: tuple[str, ...] | None = None,
    input_size: int = 224,
) -> SourceModel:
    """A torchvision architecture with a state-dict file, or a weights enum name.

    ``weights`` is a path to a ``.safetensors``/``.pt`` state dict, or the name of a
    torchvision weights enum member (e.g. ``IMAGENET1K_V1``) whose file is already in torch's
    hub cache: nothing is ever downloaded (see :mod:`reprogram.zoo.loaders`).
    """
    from reprogram.zoo.loaders import load_torchvision as load

    net, meta = load(arch, weights, class_names=class_names, input_size=(input_size, input_size))
    return SourceModel(_wrap(net, meta.mean, meta.std), meta)


def load_model(
    name: str = "default",
    weights: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> SourceModel:
    """Resolve a model: ``default``, ``torchvision:ARCH`` (with ``weights``), or a path to a
    model folder, a model config or a weights file with its config beside it
    (:func:`reprogram.zoo.loaders.load_path`: TorchScript, ONNX, torchvision, default)."""
    if name in ZOO:
        return load_zoo(name, Path(weights) if weights else None)
    if name.startswith("torchvision:"):
        return load_torchvision(name.split(":", 1)[1], weights, class_names)
    if Path(name).exists():
        from reprogram.zoo.loaders import load_path

        if weights is not None:
            raise ModelError(f"expected no --weights with the model path {name!r}: its config"
                             " names the weights")
        model = load_path(name)
        if class_names is not None:
            if len(class_names) != model.meta.num_classes:
                raise ModelError(f"expected {model.meta.num_classes} class names for {name!r},"
                                 f" got {len(class_names)}")
            model = SourceModel(model.module, replace(model.meta, class_names=class_names),
                                model.differentiable)
        return model
    raise ModelError(f"expected a zoo model ({', '.join(ZOO)}), 'torchvision:ARCH' or the path"
                     f" of a model folder, config or file, got {name!r} (no such file)")
