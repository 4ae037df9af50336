"""What travels to the model: 8-bit or float tensors, or encoded PNG/JPEG files.

``uint8`` and ``fp32`` are tensor wires (V2, KServe V1); ``png`` and ``jpeg:Q`` are image files
for the APIs that take an upload (TorchServe, label APIs). PNG is lossless, so it delivers what
``uint8`` does; JPEG at quality Q (1..95) is lossy, and :func:`jpeg_roundtrip` lets a local
model see exactly what a JPEG API would (``LocalOracle(wire="jpeg:90")``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from reprogram.errors import ConfigError

WireKind = Literal["uint8", "fp32", "png", "jpeg"]


@dataclass(frozen=True)
class Wire:
    """A parsed wire: ``kind`` and, for JPEG, its quality."""

    kind: WireKind
    quality: int = 0

    def __str__(self) -> str:
        return f"jpeg:{self.quality}" if self.kind == "jpeg" else self.kind

    @property
    def is_image(self) -> bool:
        return self.kind in ("png", "jpeg")

    @property
    def tensor_dtype(self) -> Literal["uint8", "fp32"]:
        """The tensor datatype this wire sends over a tensor protocol (images go as uint8)."""
        return "fp32" if self.kind == "fp32" else "uint8"

    @property
    def content_type(self) -> str:
        return "image/jpeg" if self.kind == "jpeg" else "image/png"


def parse_wire(spec: str | Wire) -> Wire:
    """``uint8`` | ``fp32`` | ``png`` | ``jpeg:Q`` (Q in 1..95) -> :class:`Wire`."""
    if isinstance(spec, Wire):
        return spec
    if spec in ("uint8", "fp32", "png"):
        return Wire(spec)  # type: ignore[arg-type]
    if spec.startswith("jpeg:"):
        try:
            quality = int(spec.split(":", 1)[1])
        except ValueError:
            quality = 0
        if 1 <= quality <= 95:
            return Wire("jpeg", quality)
    raise ConfigError(f"expected a wire uint8, fp32, png or jpeg:Q (Q in 1..95), got {spec!r}")


def encode_image(pixels: np.ndarray, wire: Wire) -> bytes:
    """A PNG or JPEG file of one uint8 ``[3, H, W]`` image."""
    img = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
    buffer = io.BytesIO()
    if wire.kind == "jpeg":
        img.save(buffer, format="JPEG", quality=wire.quality)
    else:
        img.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] ``[N, 3, H, W]`` -> uint8 on the 8-bit grid (what an API receives)."""
    with torch.no_grad():
        return torch.round(x.detach().cpu().clamp(0, 1) * 255.0).to(torch.uint8).numpy()


@torch.no_grad()
def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """What a JPEG API decodes from ``x`` in [0, 1] ``[N, 3, H, W]`` sent at ``quality``."""
    out = np.empty((x.shape[0], x.shape[2], x.shape[3], 3), dtype=np.uint8)
    for i, pixels in enumerate(to_uint8(x)):
        with Image.open(io.BytesIO(encode_image(pixels, Wire("jpeg", quality)))) as img:
            out[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, torch.float32) / 255.0
