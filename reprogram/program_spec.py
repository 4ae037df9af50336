"""The geometry of a visual program: :class:`ProgramSpec`, its kinds, and the input transform.

Kinds (what each renders; :mod:`reprogram.programs` draws them):

- ``expand``: ILM-VP's expansive prompt (Chen et al. 2023, "Understanding and Improving Visual
  Prompting: A Label-Mapping Perspective", section 3; OPTML-Group/ILM-VP
  ``models/visual_prompt.py``, ``ExpansiveVisualPrompt.forward``): the target image, resized to
  ``inner x inner``, sits in the centre of the frame and ``sigmoid(theta)`` fills the border.
- ``add-pad``: Bahng et al. 2022 ("Exploring Visual Prompts for Adapting Large-Scale Models",
  section 3; hjbahng/visual_prompting ``models/prompters.py``, ``PadPrompter``): the image fills
  the frame and ``theta`` is *added* to a border ``patch_size`` pixels wide.
- ``add-patch``: Bahng et al.'s fixed patch (``FixedPatchPrompter``): ``theta`` is added to the
  top-left ``patch_size x patch_size`` square of the full-size image.
- ``mask``: Elsayed et al. 2019 ("Adversarial Reprogramming of Neural Networks", section 2):
  ``X_adv = X~ + tanh(W * M)`` with the image embedded at ``inner x inner`` (its native size)
  in the centre of a frame that is 0 in the paper's [-1, 1] range, and ``M`` 0 over the image.
  In [0, 1] pixels: the image inside, ``(1 + tanh(W)) / 2`` on the border (no clipping needed).
  The fit adds ``weight_penalty * ||W||^2`` to the loss (the paper's ``lambda``).
- ``patch``: a learnable ``sigmoid(theta)`` square *replaces* the top-left corner of the
  full-size image.
- ``full``: ``clamp(embed(x_t) + M * tanh(theta), 0, 1)`` over the whole frame on a black
  background, ``M`` everywhere (``mask='none'``) or outside the image (``mask='border'``): the
  overlay this project's black-box defaults use.
- ``vpt-shallow`` / ``vpt-deep``: Visual Prompt Tuning (Jia et al. 2022; :mod:`reprogram.tokens`):
  no pixels change, the image fills the frame, and ``theta`` is the prompt tokens a frozen
  ViT reads (``tokens`` names their geometry); white-box, on a local ViT.
- ``coordinator``: BlackVIP's input-dependent prompt (Oh et al. 2023; :mod:`reprogram.coordinator`):
  ``clamp(x + eps * decoder(encoder(x), p_trigger), 0, 1)`` on the full-size image, ``theta``
  the decoder's and trigger's flat vector; ``coordinator`` names the frozen encoder.

Deprecated aliases, accepted for one release (specs, artifacts, the CLI): ``pad`` = ``expand``.
A spec built from an alias records the new name.

Where the papers' prompts act on normalized inputs without clipping (Bahng et al. add theta to
CLIP-normalized images), ours act on [0, 1] pixels and are clipped to [0, 1]: a query carries an
image, and an image has that range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from reprogram.context import CONTEXT_KINDS, ContextSpec
from reprogram.coordinator import CoordinatorSpec, theta_dim
from reprogram.errors import ConfigError, DataError, check_int, spec_fields
from reprogram.tokens import TokenSpec

__all__ = [
    "KIND_ALIASES",
    "InputTransform",
    "MaskKind",
    "ProgramKind",
    "ProgramSpec",
    "canonical_kind",
    "grid_shape",
]

ProgramKind = Literal["expand", "add-pad", "add-patch", "mask", "patch", "full", "coordinator",
                      "vpt-shallow", "vpt-deep", "coop", "coop-csc"]
TOKEN_KINDS = ("vpt-shallow", "vpt-deep")
MaskKind = Literal["border", "none"]
# old name -> new name; kept for one release so specs and artifacts written with it still load
KIND_ALIASES: dict[str, str] = {"pad": "expand"}
# kinds whose image fills the whole frame (inner is resized again to the frame)
FULL_IMAGE_KINDS = ("add-pad", "add-patch", "patch", "coordinator", *TOKEN_KINDS,
                    *CONTEXT_KINDS)
# kinds whose image is embedded in the centre with a border around it
BORDER_KINDS = ("expand", "mask")


def canonical_kind(kind: object) -> object:
    """The current name of a program kind (an alias becomes its new name)."""
    return KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else kind


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[N, C, h, w]`` to ``size``; antialiased when downsampling."""
    if tuple(x.shape[-2:]) == size:
        return x
    down = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


@dataclass(frozen=True)
class InputTransform:
    """Turn target images into the program's input: float32 ``[N, 3, inner, inner]`` in [0, 1].

    Accepts uint8 images ``[N, C, h, w]`` (0..255) or floating images in [0, 1], with ``C`` = 1
    (grayscale, replicated to 3 channels) or 3. Resizing is bilinear (``align_corners=False``),
    antialiased when downsampling; an image that already has the inner size is copied exactly.
    """

    inner_size: int

    def __post_init__(self) -> None:
        check_int("inner_size", self.inner_size, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"expected images [N, 1 or 3, h, w], got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)  # in place: one full-size float copy, not two
        elif x.is_floating_point():
            if x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
                raise DataError(
                    f"expected float images in [0, 1], got range [{float(x.min()):.4g}, "
                    f"{float(x.max()):.4g}]; pass uint8 for 0..255 images"
                )
            x = x.to(torch.float32)
        else:
            raise DataError(f"expected uint8 or floating images, got dtype {x.dtype}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = _resize(x, (self.inner_size, self.inner_size))
        return x.clamp(0.0, 1.0).contiguous()


def grid_shape(resolution: int, size: tuple[int, int]) -> tuple[int, int]:
    """The coarse grid over an area of ``size = (H, W)``: ``resolution`` cells along the shorter
    side, the longer side in proportion (never more cells than pixels)."""
    h, w = size
    short = min(h, w)
    rows = resolution if h == short else min(h, round(resolution * h / short))
    cols = resolution if w == short else min(w, round(resolution * w / short))
    return (rows, cols)


@dataclass(frozen=True, kw_only=True)
class ProgramSpec:
    """Geometry and parameterization of a :class:`Program` (JSON-safe via ``to_dict``).

    Attributes:
        kind: ``expand`` | ``add-pad`` | ``add-patch`` | ``mask`` | ``patch`` | ``full`` (see
            the module docstring); the deprecated alias ``pad`` is stored as ``expand``.
        frame_size: ``(H, W)`` of the source model input, e.g. ``(32, 32)``.
        inner_size: side of the resized target image. For ``expand``/``mask``/``full`` it is
            placed in the centre of the frame; for ``add-pad``/``add-patch``/``patch`` it is
            resized again to fill the whole frame (use the frame side to avoid a second resize).
        resolution: theta lives on an ``R x R`` grid (``R x round(R * W / H)`` on a frame wider
            than tall, and the transpose) bilinearly upsampled to the program area (the frame,
            or the patch for ``patch``/``add-patch``); ``None`` = full resolution.
        patch_size: side of the top-left patch (``patch``, ``add-patch``), or the width of the
            border (``add-pad``: Bahng et al.'s ``prompt_size``).
        mask: ``full`` only: ``none`` = overlay everywhere, ``border`` = only outside the centre
            (``mask`` always masks the image out; ``add-pad`` always adds on the border only).
        init_std: theta is initialised ``N(0, init_std^2)`` from a seeded generator (0 = zeros:
            a mid-grey border for ``expand``/``patch``/``mask``, no overlay for ``full`` and the
            additive kinds); ``coordinator`` always starts as BlackVIP does.
        coordinator: ``coordinator`` only: the encoder and decoder geometry
            (:class:`~reprogram.coordinator.CoordinatorSpec`).
        tokens: ``vpt-*`` only: the prompt tokens' and the ViT's geometry
            (:class:`~reprogram.tokens.TokenSpec`).
        context: ``coop``/``coop-csc`` only: CoOp's context vectors' geometry
            (:class:`~reprogram.context.ContextSpec`).
    """

    kind: ProgramKind
    frame_size: tuple[int, int]
    inner_size: int
    resolution: int | None = None
    patch_size: int = 8
    mask: MaskKind = "none"
    init_std: float = 0.0
    coordinator: CoordinatorSpec | None = None
    tokens: TokenSpec | None = None
    context: ContextSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", canonical_kind(self.kind))
        if isinstance(self.coordinator, Mapping):
            object.__setattr__(self, "coordinator", CoordinatorSpec.from_dict(self.coordinator))
        if isinstance(self.tokens, Mapping):
            object.__setattr__(self, "tokens", TokenSpec.from_dict(self.tokens))
        if isinstance(self.context, Mapping):
            object.__setattr__(self, "context", ContextSpec.from_dict(self.context))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless the spec describes a buildable program."""
        if self.kind not in get_args(ProgramKind):
            raise ConfigError(f"expected kind in {get_args(ProgramKind)}, got {self.kind!r}")
        if self.mask not in get_args(MaskKind):
            raise ConfigError(f"expected mask in {get_args(MaskKind)}, got {self.mask!r}")
        fs = self.frame_size
        if not isinstance(fs, tuple) or len(fs) != 2:
            raise ConfigError(f"expected frame_size as a tuple (H, W), got {fs!r}")
        h = check_int("frame_size[0]", fs[0], 1)
        w = check_int("frame_size[1]", fs[1], 1)
        inner = check_int("inner_size", self.inner_size, 1)
        patch = check_int("patch_size", self.patch_size, 1)
        if self.kind in BORDER_KINDS and inner >= min(h, w):
            raise ConfigError(
                f"expected inner_size < min(frame_size) = {min(h, w)} for a {self.kind} "
                f"program (it needs a border), got {inner}"
            )
        if self.kind == "add-pad" and 2 * patch > min(h, w):
            raise ConfigError(f"expected patch_size (the border width) <= min(frame_size) / 2 "
                              f"= {min(h, w) // 2} for an add-pad program, got {patch}")
        if self.kind == "full" and inner > min(h, w):
            raise ConfigError(f"expected inner_size <= min(frame_size) = {min(h, w)}, got {inner}")
        if self.kind == "full" and self.mask == "border" and inner >= min(h, w):
            raise ConfigError(
                f"expected inner_size < min(frame_size) = {min(h, w)} with mask='border', "
                f"got {inner}"
            )
        if self.kind != "full" and self.mask != "none":
            raise ConfigError(f"expected mask='none' for a {self.kind} program, got {self.mask!r}")
        if self.kind in ("patch", "add-patch") and patch > min(h, w):
            raise ConfigError(f"expected patch_size <= min(frame_size) = {min(h, w)}, got {patch}")
        self._validate_coordinator()
        self._validate_tokens()
        self._validate_context()
        if self.resolution is not None:
            res = check_int("resolution", self.resolution, 1)
            limit = patch if self.kind in ("patch", "add-patch") else min(h, w)
            if res > limit:
                raise ConfigError(f"expected resolution <= {limit} (no downsampling), got {res}")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, int | float)
            or not math.isfinite(self.init_std)
            or self.init_std < 0
        ):
            raise ConfigError(f"expected init_std a finite float >= 0, got {self.init_std!r}")

    def _validate_coordinator(self) -> None:
        if self.kind != "coordinator":
            if self.coordinator is not None:
                raise ConfigError(f"expected no coordinator for a {self.kind} program")
            return
        if not isinstance(self.coordinator, CoordinatorSpec):
            raise ConfigError("expected a coordinator spec (the encoder) for a coordinator "
                              "program, got none")
        if self.resolution is not None:
            raise ConfigError("expected no resolution for a coordinator program (its decoder "
                              "draws the prompt at the frame's size)")
        self.coordinator.check_frame(self.frame_size)

    def _validate_tokens(self) -> None:
        if self.kind not in TOKEN_KINDS:
            if self.tokens is not None:
                raise ConfigError(f"expected no prompt tokens for a {self.kind} program")
            return
        if not isinstance(self.tokens, TokenSpec):
            raise ConfigError(f"expected the token geometry for a {self.kind} program, got none")
        if f"vpt-{self.tokens.depth}" != self.kind:
            raise ConfigError(f"expected {self.kind} tokens, got {self.tokens.depth} ones")
        if self.resolution is not None:
            raise ConfigError(f"expected no resolution for a {self.kind} program (its "
                              f"parameters are tokens, not pixels)")
        if self.inner_size != min(self.frame_size):
            raise ConfigError(f"expected inner_size {min(self.frame_size)} (the image fills "
                              f"the frame) for a {self.kind} program, got {self.inner_size}")

    def _validate_context(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            if self.context is not None:
                raise ConfigError(f"expected no context vectors for a {self.kind} program")
            return
        if not isinstance(self.context, ContextSpec):
            raise ConfigError(f"expected the context geometry for a {self.kind} program, got"
                              " none")
        if self.context.kind != self.kind:
            raise ConfigError(f"expected {self.kind} context, got {self.context.kind} context")
        if self.resolution is not None or self.inner_size != min(self.frame_size):
            raise ConfigError(f"expected no resolution and inner_size {min(self.frame_size)}"
                              f" (the image fills the frame) for a {self.kind} program")

    @property
    def area_size(self) -> tuple[int, int]:
        """``(H, W)`` of the area theta covers: the frame, or the patch for the patch kinds."""
        if self.kind in ("patch", "add-patch"):
            return (self.patch_size, self.patch_size)
        return self.frame_size

    @property
    def theta_shape(self) -> tuple[int, ...]:
        """``(3, R, R)`` when coarse, else ``(3, H, W)`` of :attr:`area_size`; ``(d,)`` for
        ``coordinator``."""
        if self.coordinator is not None:
            return (theta_dim(self.coordinator, self.frame_size),)
        if self.tokens is not None:
            return self.tokens.shape
        if self.context is not None:
            return self.context.shape
        if self.resolution is not None:
            return (3, *grid_shape(self.resolution, self.area_size))
        return (3, *self.area_size)

    def input_transform(self) -> InputTransform:
        """The :class:`InputTransform` that prepares target images for this program."""
        return InputTransform(inner_size=self.inner_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``frame_size`` as a list); inverse of :meth:`from_dict`."""
        d = asdict(self)
        d["frame_size"] = list(self.frame_size)
        if self.coordinator is None:
            del d["coordinator"]  # artifacts of the other kinds read as before
        if self.tokens is None:
            del d["tokens"]
        if self.context is None:
            del d["context"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProgramSpec:
        """Build and validate a spec from :meth:`to_dict` output; :class:`ConfigError` if bad."""
        kwargs = spec_fields("ProgramSpec", d, cls.__dataclass_fields__,
                             ("kind", "frame_size", "inner_size"))
        fs = kwargs["frame_size"]
        if not isinstance(fs, list | tuple):
            raise ConfigError(f"expected frame_size as [H, W], got {fs!r}")
        kwargs["frame_size"] = tuple(fs)
        return cls(**kwargs)


