"""Checks on untrusted prompt artifacts, made before any tensor is built.

A prompt file may come from anyone (an upload to the server, a file handed around), and its
digest proves nothing: whoever forges the file recomputes it. So :func:`read_header` reads
only the safetensors header and the JSON metadata, each parsed with
:func:`reprogram.strict.loads_bounded` (size and nesting depth checked before ``json.loads``),
and turns them into specs and declared tensor shapes without allocating anything. The caller
can then check the geometry against the model it serves (frame size, class count, weights)
before any memory is committed. :func:`check_tensors` compares the declared tensors with
the ones the specs build (names, dtypes, shapes) by building program and label map on
PyTorch's ``meta`` device, which allocates nothing, and bounds what the real build will hold
(:data:`MAX_BUILD_BYTES`). :func:`check_finite` refuses NaN and infinite weights once the
tensors are loaded. Every failure is an :class:`~reprogram.errors.ArtifactError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from reprogram.errors import ArtifactError, ConfigError, ProtocolError
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.programs import ProgramSpec, build_program
from reprogram.strict import check_shape, loads_bounded

FORMAT_NAME = "reprogram.prompt"
SCHEMA_VERSION = 1
META_KEY = "reprogram"
REQUIRED = ("format", "schema_version", "program", "labelmap", "target_classes", "source",
            "digest")
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_CLASSES = 100_000
MAX_FRAME_SIDE = 65_536
MAX_BUILD_BYTES = 256 * 1024 * 1024
"""Parameters and buffers (masks) that a rebuilt program and label map may hold together."""

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
}
"""safetensors dtype names a prompt may use, and their torch dtypes."""


@dataclass(frozen=True)
class PromptHeader:
    """What a prompt file declares, read without building any tensor."""

    meta: dict[str, Any]
    program: ProgramSpec
    labelmap: LabelMapSpec
    target_classes: tuple[str, ...]
    source: dict[str, Any]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]


def read_header(data: bytes) -> PromptHeader:
    """Parse and check the header and metadata of prompt bytes (nothing is allocated)."""
    if len(data) < 8:
        raise ArtifactError(f"expected a safetensors prompt file, got {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise ArtifactError("expected a safetensors prompt file, got a truncated or foreign "
                            f"file (header of {n} bytes in a {len(data)}-byte file)")
    header = _json(data[8 : 8 + n], "the safetensors header")
    if not isinstance(header, dict):
        raise ArtifactError("expected a JSON object as the safetensors header")
    extra = header.pop("__metadata__", None)
    raw = extra.get(META_KEY) if isinstance(extra, dict) else None
    if not isinstance(raw, str):
        raise ArtifactError("expected a reprogram prompt (no 'reprogram' metadata in the "
                            "safetensors header); was it written by `reprogram fit`?")
    meta = _json(raw, "the prompt metadata")
    _check_record(meta)
    tensors = {name: _declared(name, entry, len(data) - 8 - n)
               for name, entry in header.items()}
    program, labelmap = _specs(meta)
    classes = meta["target_classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ArtifactError("expected target_classes as a JSON list of strings")
    if len(classes) != labelmap.num_target:
        raise ArtifactError(f"expected {labelmap.num_target} target class names, got "
                            f"{len(classes)}")
    if not isinstance(meta["source"], dict):
        raise ArtifactError(f"expected the source model as a JSON object, got"
                            f" {type(meta['source']).__name__}")
    return PromptHeader(meta=meta, program=program, labelmap=labelmap,
                        target_classes=tuple(classes), source=dict(meta["source"]),
                        tensors=tensors)


def _json(text: bytes | str, what: str) -> Any:
    try:
        return loads_bounded(text, what, max_bytes=MAX_HEADER_BYTES, max_depth=MAX_JSON_DEPTH,
                             error=ArtifactError)
    except ArtifactError as exc:
        raise ArtifactError(f"prompt file is corrupt: {exc}") from None


def _check_record(meta: object) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"expected format {FORMAT_NAME!r}, got "
                            f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"expected prompt schema version {SCHEMA_VERSION}, got "
                            f"{meta.get('schema_version')!r}; re-export it with this version")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ArtifactError(f"prompt metadata lacks {missing}")
    floor = meta.get("floor", 1e-6)
    if isinstance(floor, bool) or not isinstance(floor, int | float) or not (
            math.isfinite(floor) and 0 < floor < 1):
        raise ArtifactError(f"expected a score floor in (0, 1), got {floor!r}")
    if meta.get("remainder", "floor") not in ("floor", "share"):
        raise ArtifactError(f"expected remainder 'floor' or 'share', got "
                            f"{meta.get('remainder')!r}")


def _declared(name: str, entry: object, data_bytes: int) -> tuple[torch.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` of one tensor entry of the safetensors header, checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise ArtifactError(f"expected a tensor entry with dtype, shape and data_offsets for"
                            f" {name!r}")
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ArtifactError(f"expected tensor {name!r} of a dtype in {sorted(DTYPES)}, got"
                            f" {entry['dtype']!r}")
    try:
        shape = check_shape(entry.get("shape"), f"tensor {name!r}")
    except ProtocolError as exc:
        raise ArtifactError(str(exc)) from None
    offsets = entry.get("data_offsets")
    size = math.prod(shape) * dtype.itemsize
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
            or offsets[1] - offsets[0] != size):
        raise ArtifactError(f"prompt file is truncated or corrupt: expected data_offsets of"
                            f" tensor {name!r} to span its {size} bytes inside the file's"
                            f" {data_bytes} bytes of data, got {offsets!r}")
    return dtype, shape


def _specs(meta: dict[str, Any]) -> tuple[ProgramSpec, LabelMapSpec]:
    try:
        program = ProgramSpec.from_dict(meta["program"])
        labelmap = LabelMapSpec.from_dict(meta["labelmap"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise ArtifactError(f"prompt metadata is invalid: {exc}") from None
    if max(program.frame_size) > MAX_FRAME_SIDE:
        raise ArtifactError(f"expected a frame of at most {MAX_FRAME_SIDE} pixels a side, got"
                            f" {list(program.frame_size)}")
    if max(labelmap.num_source, labelmap.num_target) > MAX_CLASSES:
        raise ArtifactError(f"expected at most {MAX_CLASSES} source and target classes, got"
                            f" {labelmap.num_source} and {labelmap.num_target}")
    return program, labelmap


def check_tensors(header: PromptHeader) -> None:
    """The declared tensors are exactly those the specs build, and the build is bounded."""
    try:
        with torch.device("meta"):
            modules = {"program": build_program(header.program),
                       "labelmap": build_labelmap(header.labelmap)}
    except (RuntimeError, ValueError, OverflowError, TypeError) as exc:  # e.g. init_std 1e30
        raise ArtifactError(f"prompt metadata describes no buildable program: {exc}") from None
    held = sum(t.numel() * t.element_size() for m in modules.values()
               for t in (*m.parameters(), *m.buffers()))
    if held > MAX_BUILD_BYTES:
        raise ArtifactError(f"expected a program and label map of at most {MAX_BUILD_BYTES}"
                            f" bytes once built, got {held}")
    foreign = sorted(k for k in header.tensors if k.partition(".")[0] not in modules
                     or not k.partition(".")[2])
    if foreign:
        raise ArtifactError(f"expected tensors named program.* or labelmap.*, got {foreign}")
    want = {f"{head}.{k}": (v.dtype, tuple(v.shape))
            for head, m in modules.items() for k, v in m.state_dict().items()}
    unfit = "prompt tensors do not fit its program/label map"
    if set(want) != set(header.tensors):
        raise ArtifactError(f"{unfit}: expected tensors {sorted(want)}, got"
                            f" {sorted(header.tensors)}")
    for name, (dtype, shape) in want.items():
        got_dtype, got_shape = header.tensors[name]
        if got_dtype != dtype:
            raise ArtifactError(f"{unfit}: expected tensor {name} of dtype {dtype}, got"
                                f" {got_dtype}")
        if got_shape != shape:
            raise ArtifactError(f"{unfit}: expected tensor {name} of shape {list(shape)}, got"
                                f" {list(got_shape)}")


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite values in any floating-point tensor."""
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"expected finite values in tensor {name}, got NaN or Inf;"
                                " the prompt's training diverged")
