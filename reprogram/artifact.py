"""Prompt artifacts: one ``.safetensors`` file with the program and label-map tensors and JSON
metadata in its header.

Loading never unpickles: the header is parsed as JSON (bounded in size and depth) and the
tensors by ``safetensors``. A digest over the canonical metadata and every tensor's bytes is
stored in the header and checked on load, so a truncated, edited or tampered file is rejected
with a clear message. Since a forger can recompute the digest, everything the file declares
is checked before any tensor is built (see :mod:`reprogram.artifact_check`): the geometry,
the class counts, the tensors' names, dtypes and shapes, and then their values (finite); the
program and label map are rebuilt from their specs and must accept the tensors exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from reprogram.artifact_check import (
    FORMAT_NAME,
    META_KEY,
    SCHEMA_VERSION,
    PromptHeader,
    check_finite,
    check_tensors,
    read_header,
)
from reprogram.errors import ArtifactError, ConfigError, DataError, ModelError
from reprogram.fsutil import write_atomic
from reprogram.labelmaps import LabelMapSpec, Remainder, build_labelmap
from reprogram.oracles import Oracle
from reprogram.pipeline import Reprogrammer
from reprogram.programs import ProgramSpec, build_program

log = logging.getLogger(__name__)

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """A learned prompt: program + label map, what it was made for and how well it does."""

    program: ProgramSpec
    labelmap: LabelMapSpec
    tensors: dict[str, torch.Tensor]
    target_classes: tuple[str, ...]
    source: dict[str, Any]
    wire_dtype: str = "uint8"
    output_kind: str = "probs"
    floor: float = 1e-6
    remainder: Remainder = "floor"
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    queries: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_reprogrammer(cls, model: Reprogrammer, **kwargs: Any) -> Prompt:
        tensors = {f"program.{k}": v.detach().clone().contiguous()
                   for k, v in model.program.state_dict().items()}
        tensors.update({f"labelmap.{k}": v.detach().clone().contiguous()
                        for k, v in model.labelmap.state_dict().items()})
        return cls(program=model.program.spec, labelmap=model.labelmap.spec, tensors=tensors,
                   floor=model.floor, remainder=model.remainder, **kwargs)

    def build(self) -> Reprogrammer:
        """Rebuild the program and label map with the stored tensors (strictly)."""
        try:
            program = build_program(self.program)
        except ModelError as exc:  # a coordinator's encoder is missing or not the one it had
            raise ArtifactError(f"prompt cannot run here: {exc}") from None
        labelmap = build_labelmap(self.labelmap)
        parts: dict[str, dict[str, torch.Tensor]] = {"program": {}, "labelmap": {}}
        for key, value in self.tensors.items():
            head, _, name = key.partition(".")
            if head not in parts or not name:
                raise ArtifactError(f"expected tensors named program.* or labelmap.*, got {key!r}")
            parts[head][name] = value
        for head, module in (("program", program), ("labelmap", labelmap)):
            want = module.state_dict()
            for name, value in parts[head].items():
                if name in want and value.dtype != want[name].dtype:
                    raise ArtifactError(f"expected tensor {head}.{name} of dtype "
                                        f"{want[name].dtype}, got {value.dtype}")
        try:
            program.load_state_dict(parts["program"], strict=True)
            labelmap.load_state_dict(parts["labelmap"], strict=True)
        except (RuntimeError, DataError) as exc:
            raise ArtifactError(f"prompt tensors do not fit its program/label map: {exc}") from exc
        return Reprogrammer(program, labelmap, floor=self.floor, remainder=self.remainder)

    def metadata(self) -> dict[str, Any]:
        """The JSON header record (without the digest)."""
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "program": self.program.to_dict(),
            "input_transform": {"inner_size": self.program.inner_size, "resize": "bilinear"},
            "labelmap": self.labelmap.to_dict(),
            "target_classes": list(self.target_classes),
            "source": self.source,
            "wire_dtype": self.wire_dtype,
            "output_kind": self.output_kind,
            "floor": self.floor,
            "remainder": self.remainder,
            "config": self.config,
            "seed": self.seed,
            "queries": self.queries,
            "metrics": self.metrics,
        }


def _digest(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, raw bytes
    return h.hexdigest()


def dump_prompt(prompt: Prompt) -> bytes:
    """Serialize to the bytes of a ``.safetensors`` file."""
    meta = prompt.metadata()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in prompt.tensors.items()}
    meta["digest"] = _digest(meta, tensors)
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def save_prompt(prompt: Prompt, path: str | Path) -> Path:
    """Write atomically (temporary file + rename): an existing file is never half-replaced."""
    return write_atomic(Path(path), dump_prompt(prompt))


def loads_prompt(data: bytes,
                 check: Callable[[PromptHeader], None] | None = None) -> Prompt:
    """Parse and validate prompt bytes; raises :class:`ArtifactError` on any problem.

    The header and metadata are checked first, without building a tensor
    (:mod:`reprogram.artifact_check`); ``check`` (e.g. :func:`check_compatible` against a
    served model) runs on them next. Then the tensors are loaded (no more than the file
    holds), the digest is verified, the declared tensors are compared with those the specs
    build (on the ``meta`` device, allocating nothing), the values are checked for NaN and
    Inf, and only then are program and label map built.
    """
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"expected a prompt file of at most {MAX_ARTIFACT_BYTES} bytes, "
                            f"got {len(data)}")
    header = read_header(data)
    if check is not None:
        check(header)
    try:
        tensors = st_load(data)  # at most the file's size, already bounded
    except SafetensorError as exc:
        raise ArtifactError(f"prompt file is corrupt or truncated: {exc}") from exc
    meta = dict(header.meta)
    digest = meta.pop("digest")
    if _digest(meta, tensors) != digest:
        raise ArtifactError("prompt digest mismatch: the file was edited or corrupted after "
                            "it was written")
    check_tensors(header)
    check_finite(tensors)
    try:
        prompt = Prompt(
            program=header.program,
            labelmap=header.labelmap,
            tensors=tensors,
            target_classes=header.target_classes,
            source=header.source,
            wire_dtype=str(meta.get("wire_dtype", "uint8")),
            output_kind=str(meta.get("output_kind", "probs")),
            floor=float(meta.get("floor", 1e-6)),
            remainder=meta.get("remainder", "floor"),  # prompts made before it existed
            config=dict(meta.get("config", {})),
            seed=int(meta.get("seed", 0)),
            queries=dict(meta.get("queries", {})),
            metrics=dict(meta.get("metrics", {})),
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise ArtifactError(f"prompt metadata is invalid: {exc}") from exc
    prompt.build()  # tensors must fit the specs exactly
    return prompt


def load_prompt(path: str | Path) -> Prompt:
    """Load and validate a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"expected a prompt file, got {str(path)!r}: no such file")
    if path.stat().st_size > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"expected a prompt file of at most {MAX_ARTIFACT_BYTES} bytes, "
                            f"got {path.stat().st_size}")
    return loads_prompt(path.read_bytes())


# what an endpoint's metadata says about its model when it gives no weights fingerprint
IDENTITY_KEYS = ("name", "versions", "platform", "input_shape", "output_shape", "class_names")


def identity_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The identity fields that both fingerprints give and that differ."""
    return [f"{key} {recorded[key]!r} != {current[key]!r}" for key in IDENTITY_KEYS
            if recorded.get(key) is not None and current.get(key) is not None
            and recorded[key] != current[key]]


def _source_width(prompt: Prompt | PromptHeader, num_classes: int,
                  oracle: Oracle | None) -> int:
    """What the prompt's label map must read: the class count, or for token prompts with
    VPT's head the ViT's width; token prompts are checked against the ViT's geometry."""
    context = prompt.program.context
    if context is not None:
        if oracle is None:
            raise ArtifactError(f"prompt holds {prompt.program.kind} context vectors, which"
                                " need a local vision-language model")
        try:
            context.check_model(oracle.context_width(), num_classes)
        except ConfigError as exc:
            raise ArtifactError(f"prompt holds {prompt.program.kind} context: {exc}") from None
        return num_classes
    tokens = prompt.program.tokens
    if tokens is None:
        return num_classes
    if oracle is None:
        raise ArtifactError(f"prompt holds {prompt.program.kind} tokens, which need a local "
                            f"vision transformer")
    try:
        adapter = oracle.token_adapter()
        tokens.check_model(adapter)
    except (ConfigError, ModelError) as exc:
        raise ArtifactError(f"prompt holds {prompt.program.kind} tokens: {exc}") from None
    return adapter.width if prompt.labelmap.kind == "head" else num_classes


def check_compatible(prompt: Prompt | PromptHeader, input_size: tuple[int, int],
                     num_classes: int, fingerprint: dict[str, Any] | None = None, *,
                     allow_unverified: bool = False, oracle: Oracle | None = None) -> None:
    """Raise :class:`ArtifactError` unless the prompt (or a prompt file's header, before any
    tensor is built) was made for a model of this shape and,
    as far as the model's fingerprint tells, this model.

    With weights SHA-256 on both sides they must agree. Without (an endpoint whose metadata
    gives none), the identity the metadata does give (name, versions, platform, shapes, class
    names) must agree unless ``allow_unverified``; either way the weights stay unverified,
    which is logged. Token prompts (``vpt-*``) also need ``oracle``: a local ViT of the
    prompt's geometry (layers, width, patch)."""
    if tuple(prompt.program.frame_size) != tuple(input_size):
        raise ArtifactError(f"prompt was made for {list(prompt.program.frame_size)} inputs, "
                            f"this model takes {list(input_size)}")
    width = _source_width(prompt, num_classes, oracle)
    if prompt.labelmap.num_source != width:
        what = "features" if width != num_classes else "source classes"
        raise ArtifactError(f"prompt was made for {prompt.labelmap.num_source} {what}, "
                            f"this model has {width}")
    current = fingerprint or {}
    want = prompt.source.get("weights_sha256")
    have = current.get("weights_sha256")
    if want and have:
        if want != have:
            raise ArtifactError(f"prompt was made for model weights {want}, this model has "
                                f"{have}")
        return
    diffs = identity_mismatch(prompt.source, current)
    if diffs and not allow_unverified:
        raise ArtifactError(f"prompt was made for another model ({'; '.join(diffs)}) and the "
                            "weights cannot be compared (no fingerprint); pass "
                            "--allow-unverified-model to use it anyway")
    log.warning("cannot verify that this is the model the prompt was made for (no weights "
                "fingerprint on %s)%s", "either side" if not (want or have) else
                "one side", f"; using it anyway although {'; '.join(diffs)}" if diffs
                else "; its name and shapes match")
