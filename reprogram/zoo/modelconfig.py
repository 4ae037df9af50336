"""The model config: a small JSON file next to a model's weights saying how to run it.

One file per model (``config.json`` in the model's folder, or ``NAME.json`` beside
``NAME.onnx``/``NAME.pt``), read by :func:`read_model_config`::

    {"format": "onnx", "weights": "model.onnx", "input_size": [224, 224],
     "resize": "crop", "resize_size": 256, "mean": [0.485, 0.456, 0.406],
     "std": [0.229, 0.224, 0.225], "class_names": "classes.txt", "max_batch": 64}

Keys (every one but ``format`` optional; unknown keys are an error, so typos do not pass):

- ``format``: ``default`` (the shipped model), ``torchvision`` (an architecture, with
  ``architecture`` and a state-dict ``weights`` file or a weights enum whose file is already
  in torch's hub cache: nothing is downloaded), ``torchscript`` (``torch.jit.load``) or
  ``onnx`` (onnxruntime, CPU; no autograd).
- ``weights``: the file, relative to the config (default: ``model.pt`` / ``model.onnx``).
- ``input_size``: ``[H, W]`` (or one int for a square) the network takes. Required for
  ``torchscript``; an ONNX graph with a static size must agree with it. A load runs one
  forward pass at this size, so a config that lies about it fails at load with the file named.
- ``resize`` and ``resize_size``: how the server's ``/v1`` upload route fits a natural image to
  the input: ``stretch`` (bilinear to ``H x W``, the default), ``crop`` (shorter side to
  ``resize_size``, default ``round(H * 256 / 224)``, then a centre crop, as torchvision's
  ImageNet transforms) or ``letterbox`` (fit inside, aspect kept, black bars).
- ``mean``/``std``: per-channel normalization the loader applies to [0, 1] pixels before the
  network (default: none, for exports that normalize inside; ImageNet's for ``torchvision``).
- ``class_names``: a list, or a file (JSON list or one name per line) relative to the config;
  default ``class_0 ..`` from the output width.
- ``layout``: ``NCHW`` (default) or ``NHWC``: what the network's input tensor is; the server
  and oracles always speak ``[N, 3, H, W]`` and the loader transposes.
- ``max_batch``: the most images one forward pass and one request may hold (the V2
  ``max_batch_size``), for large inputs or graphs exported with a fixed batch.
- ``output``: ``logits`` (default) or ``probs`` (a graph ending in softmax; the loader takes
  the log, which softmax maps back to the same probabilities).
- ``name``: the served name (default: the model's folder name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from PIL import Image

from reprogram.errors import ModelError

__all__ = ["CONFIG_NAME", "ModelConfig", "ResizePolicy", "read_model_config", "resize_image"]

CONFIG_NAME = "config.json"
ModelFormat = Literal["default", "torchvision", "torchscript", "onnx"]
ResizePolicy = Literal["stretch", "crop", "letterbox"]
Layout = Literal["NCHW", "NHWC"]
OutputScores = Literal["logits", "probs"]
_DEFAULT_WEIGHTS = {"torchscript": "model.pt", "onnx": "model.onnx"}
_KEYS = ("format", "weights", "name", "architecture", "input_size", "resize", "resize_size",
         "mean", "std", "class_names", "layout", "max_batch", "output")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A parsed, validated model config (see the module docstring); paths are resolved."""

    path: Path
    format: ModelFormat
    weights: Path | None = None
    name: str | None = None
    architecture: str | None = None
    input_size: tuple[int, int] | None = None
    resize: ResizePolicy = "stretch"
    resize_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    class_names: tuple[str, ...] | None = None
    layout: Layout = "NCHW"
    max_batch: int | None = None
    output: OutputScores = "logits"


def _fail(path: Path, what: str) -> ModelError:
    return ModelError(f"model config {str(path)!r}: {what}")


def _choice(path: Path, key: str, value: object, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise _fail(path, f"expected {key!r} one of {list(allowed)}, got {value!r}")
    return value


def _positive(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, f"expected {key!r} a positive integer, got {value!r}")
    return value


def _size(path: Path, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, list) or len(value) != 2:
        raise _fail(path, f"expected 'input_size' [H, W] or one integer, got {value!r}")
    return (_positive(path, "input_size", value[0]), _positive(path, "input_size", value[1]))


def _triple(path: Path, key: str, value: object, positive: bool) -> tuple[float, float, float]:
    numbers = ([float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
               if isinstance(value, list) else [])
    if len(numbers) != 3 or len(value) != 3 or (positive and min(numbers) <= 0):  # type: ignore[arg-type]
        sign = "positive " if positive else ""
        raise _fail(path, f"expected {key!r} a list of 3 {sign}numbers, got {value!r}")
    return (numbers[0], numbers[1], numbers[2])


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from a JSON list or a text file with one name per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read class names file {str(path)!r}: {exc}") from exc
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"expected a JSON list in {str(path)!r}: {exc}") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelError(f"expected a JSON list of strings in {str(path)!r}")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ModelError(f"expected at least one class name in {str(path)!r}, got none")
    return tuple(names)


def _class_names(path: Path, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return read_class_names(path.parent / value)
    if isinstance(value, list) and value and all(isinstance(n, str) for n in value):
        return tuple(value)
    raise _fail(path, f"expected 'class_names' a file name or a list of strings, got {value!r}")


def _weights(path: Path, fmt: str, value: object) -> Path | None:
    if value is None:
        default = _DEFAULT_WEIGHTS.get(fmt)
        return path.parent / default if default else None
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected 'weights' a file name, got {value!r}")
    return path.parent / value


def parse_model_config(path: Path, record: object) -> ModelConfig:
    """Validate a config ``record`` read from ``path``; :class:`ModelError` naming the file."""
    if not isinstance(record, dict):
        raise _fail(path, f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_KEYS))
    if unknown:
        raise _fail(path, f"expected keys among {list(_KEYS)}, got unknown {unknown}")
    fmt = _choice(path, "format", record.get("format"), get_args(ModelFormat))
    r = record
    if fmt == "torchvision" and not isinstance(r.get("architecture"), str):
        raise _fail(path, f"expected 'architecture' (e.g. \"resnet18\") for format torchvision,"
                          f" got {r.get('architecture')!r}")
    if fmt == "torchscript" and "input_size" not in r:
        raise _fail(path, "expected 'input_size' [H, W] for format torchscript, got none")
    name = r.get("name")
    if name is not None and not (isinstance(name, str) and name
                                 and all(c.isalnum() or c in "-_." for c in name)):
        raise _fail(path, f"expected 'name' of letters, digits, '-', '_' or '.', got {name!r}")
    return ModelConfig(
        path=path, format=fmt, weights=_weights(path, fmt, r.get("weights")), name=name,
        architecture=r.get("architecture"),
        input_size=_size(path, r["input_size"]) if "input_size" in r else None,
        resize=_choice(path, "resize", r.get("resize", "stretch"), get_args(ResizePolicy)),
        resize_size=(_positive(path, "resize_size", r["resize_size"])
                     if r.get("resize_size") is not None else None),
        mean=_triple(path, "mean", r["mean"], False) if "mean" in r else None,
        std=_triple(path, "std", r["std"], True) if "std" in r else None,
        class_names=_class_names(path, r["class_names"]) if "class_names" in r else None,
        layout=_choice(path, "layout", r.get("layout", "NCHW"), get_args(Layout)),
        max_batch=(_positive(path, "max_batch", r["max_batch"])
                   if r.get("max_batch") is not None else None),
        output=_choice(path, "output", r.get("output", "logits"), get_args(OutputScores)),
    )


def read_model_config(path: Path) -> ModelConfig:
    """Read and validate the model config at ``path`` (see the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read model config {str(path)!r}: {exc}") from exc
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise _fail(path, f"expected JSON, got {exc}") from exc
    return parse_model_config(path, record)


def resize_image(img: Image.Image, size: tuple[int, int], policy: str = "stretch",
                 resize_size: int | None = None) -> Image.Image:
    """Fit an RGB image to ``size = (H, W)`` by ``policy`` (``stretch``, ``crop``,
    ``letterbox``; see the module docstring). Bilinear filtering throughout."""
    h, w = size
    if img.size == (w, h):
        return img
    bilinear = Image.Resampling.BILINEAR
    if policy == "crop":
        short = resize_size or round(min(h, w) * 256 / 224)
        scale = max(short / min(img.size), h / img.height, w / img.width)
        scaled = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                            bilinear)
        left, top = (scaled.width - w) // 2, (scaled.height - h) // 2
        return scaled.crop((left, top, left + w, top + h))
    if policy == "letterbox":
        scale = min(h / img.height, w / img.width)
        fitted = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                            bilinear)
        canvas = Image.new("RGB", (w, h))
        canvas.paste(fitted, ((w - fitted.width) // 2, (h - fitted.height) // 2))
        return canvas
    return img.resize((w, h), bilinear)
