"""Write model folders (config + weights) that :mod:`reprogram.zoo.loaders` serves.

``python -m reprogram.zoo.export --format onnx --out repo/default-onnx`` exports the shipped
default model as ONNX (``torchscript`` as a TorchScript archive, ``default`` as a config that
names the shipped model); ``--torchvision resnet18 --out repo/resnet18`` saves a torchvision
architecture with seeded random weights as a state dict (no download; for measuring what a
real-size network costs, not for its accuracy). Each folder is one model of a repository for
``reprogram-server --model-repository repo``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from reprogram.errors import ModelError, ReprogramError
from reprogram.zoo.modelconfig import CONFIG_NAME
from reprogram.zoo.registry import IMAGENET_MEAN, IMAGENET_STD, SourceModel, load_model

__all__ = ["export_model", "save_torchvision"]


def _write_config(folder: Path, record: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def export_model(model: SourceModel, folder: Path, fmt: str, *,
                 max_batch: int | None = None) -> Path:
    """Export ``model`` (its whole module, normalization included) to ``folder`` as
    ``torchscript`` (traced) or ``onnx`` (dynamic batch), or write a ``default`` config;
    returns the config's path."""
    h, w = model.meta.input_size
    record: dict[str, Any] = {"format": fmt, "input_size": [h, w],
                              "class_names": list(model.meta.class_names)}
    if max_batch is not None:
        record["max_batch"] = max_batch
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, h, w)
    module = model.module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example)
            traced.save(str(folder / "model.pt"))
        elif fmt == "onnx":
            torch.onnx.export(module, (example,), str(folder / "model.onnx"),
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False)
        elif fmt == "default":
            if model.meta.name != "default":
                raise ModelError(f"expected the default model for format 'default', got"
                                 f" {model.meta.name!r}")
            record = {"format": "default"}
        else:
            raise ModelError(f"expected format torchscript, onnx or default, got {fmt!r}")
    return _write_config(folder, record)


def save_torchvision(arch: str, folder: Path, *, num_classes: int = 1000, seed: int = 0,
                     input_size: int = 224, max_batch: int | None = None) -> Path:
    """A torchvision architecture with seeded random weights, saved as a safetensors state
    dict with its config (ImageNet mean/std, resize 256 + centre crop); the config's path."""
    import torchvision.models as tvm

    if arch not in tvm.list_models(module=tvm):
        raise ModelError(f"expected a torchvision classification model name, got {arch!r}")
    torch.manual_seed(seed)
    net: nn.Module = tvm.get_model(arch, weights=None, num_classes=num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    record: dict[str, Any] = {"format": "torchvision", "architecture": arch,
                              "weights": "model.safetensors",
                              "input_size": [input_size, input_size], "resize": "crop",
                              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if max_batch is not None:
        record["max_batch"] = max_batch
    return _write_config(folder, record)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reprogram.zoo.export",
                                description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--format", choices=("torchscript", "onnx", "default"), default="onnx",
                   help="export the shipped default model in this format")
    p.add_argument("--torchvision", default=None, metavar="ARCH",
                   help="instead: a torchvision architecture with random weights")
    p.add_argument("--classes", type=int, default=1000, help="output classes (--torchvision)")
    p.add_argument("--input-size", type=int, default=224, help="input side (--torchvision)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (--torchvision)")
    p.add_argument("--max-batch", type=int, default=None, help="the model's batch cap")
    args = p.parse_args(argv)
    try:
        if args.torchvision:
            path = save_torchvision(args.torchvision, Path(args.out), num_classes=args.classes,
                                    seed=args.seed, input_size=args.input_size,
                                    max_batch=args.max_batch)
        else:
            path = export_model(load_model("default"), Path(args.out), args.format,
                                max_batch=args.max_batch)
    except (ReprogramError, OSError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
