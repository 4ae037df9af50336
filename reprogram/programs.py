"""Visual programs: compose a (resized) target image into the source model's input frame.

Kinds (see DESIGN.md section 3):

- ``pad``: the target image, resized to ``inner x inner``, sits in the centre of the frame and a
  learnable border surrounds it (Bahng et al. 2022 "padding" prompt; ILM-VP, Chen et al. 2023).
- ``patch``: the target image fills the frame and a learnable square patch replaces its top-left
  corner (Bahng et al. 2022 "fixed patch").
- ``full``: Elsayed et al. 2019, "Adversarial Reprogramming of Neural Networks":
  ``x_s = clamp(embed(x_t) + M * tanh(W), 0, 1)`` over the whole frame with an optional mask.

Coarse parameterization (``resolution=R``): theta lives on an ``R x R`` grid that is bilinearly
upsampled (``align_corners=False``) to the frame, as AutoZOOM does for black-box attacks. This is
what makes zeroth-order optimization affordable: the ZO dimension is ``d = 3 * R * R``. On a
non-square frame the grid keeps the frame's aspect: ``R`` cells along the shorter side and
``round(R * long / short)`` along the longer, so a cell covers the same area at any frame size.

Placement (every frame size, square or not): the target image is resized (bilinear, antialiased
when shrinking, aspect not kept) to an ``inner x inner`` square and centred in the frame; an odd
margin puts the extra pixel at the bottom and right (``top = (H - inner) // 2``). Sizes are
fractions of the frame, not pixels: the fit's defaults are ``inner = min(H, W)`` for ``full``,
``min(H, W) // 2`` for ``pad`` and a patch of ``min(H, W) // 4``, and AutoVP's input-scaling
search (:mod:`reprogram.scaling`) picks ``inner`` on validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprogram.errors import ConfigError, DataError, spec_fields
from reprogram.pixels import clamp01

__all__ = [
    "InputTransform",
    "MaskKind",
    "Program",
    "ProgramKind",
    "ProgramSpec",
    "build_program",
    "grid_shape",
]

logger = logging.getLogger(__name__)

ProgramKind = Literal["pad", "patch", "full"]
MaskKind = Literal["border", "none"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected {name} to be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"expected {name} >= {minimum}, got {value}")
    return value


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
        _check_int("inner_size", self.inner_size, 1)

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
        kind: ``pad`` | ``patch`` | ``full`` (see the module docstring).
        frame_size: ``(H, W)`` of the source model input, e.g. ``(32, 32)``.
        inner_size: side of the resized target image. For ``pad``/``full`` it is placed in the
            centre of the frame; for ``patch`` it is resized again to fill the whole frame (use
            the frame side to avoid a second resize).
        resolution: theta lives on an ``R x R`` grid (``R x round(R * W / H)`` on a frame wider
            than tall, and the transpose) bilinearly upsampled to the program area (the frame,
            or the patch for ``patch``); ``None`` = full resolution.
        patch_size: side of the top-left patch (``patch`` only).
        mask: ``full`` only: ``none`` = overlay everywhere, ``border`` = only outside the centre.
        init_std: theta is initialised ``N(0, init_std^2)`` from a seeded generator (0 = zeros:
            a mid-grey border for ``pad``/``patch``, no overlay for ``full``).
    """

    kind: ProgramKind
    frame_size: tuple[int, int]
    inner_size: int
    resolution: int | None = None
    patch_size: int = 8
    mask: MaskKind = "none"
    init_std: float = 0.0

    def __post_init__(self) -> None:
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
        h = _check_int("frame_size[0]", fs[0], 1)
        w = _check_int("frame_size[1]", fs[1], 1)
        inner = _check_int("inner_size", self.inner_size, 1)
        patch = _check_int("patch_size", self.patch_size, 1)
        if self.kind == "pad" and inner >= min(h, w):
            raise ConfigError(
                f"expected inner_size < min(frame_size) = {min(h, w)} for a pad program "
                f"(it needs a border), got {inner}"
            )
        if self.kind == "full" and inner > min(h, w):
            raise ConfigError(f"expected inner_size <= min(frame_size) = {min(h, w)}, got {inner}")
        if self.kind == "full" and self.mask == "border" and inner >= min(h, w):
            raise ConfigError(
                f"expected inner_size < min(frame_size) = {min(h, w)} with mask='border', "
                f"got {inner}"
            )
        if self.kind != "full" and self.mask != "none":
            raise ConfigError(f"expected mask='none' for a {self.kind} program, got {self.mask!r}")
        if self.kind == "patch" and patch > min(h, w):
            raise ConfigError(f"expected patch_size <= min(frame_size) = {min(h, w)}, got {patch}")
        if self.resolution is not None:
            res = _check_int("resolution", self.resolution, 1)
            limit = patch if self.kind == "patch" else min(h, w)
            if res > limit:
                raise ConfigError(f"expected resolution <= {limit} (no downsampling), got {res}")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, int | float)
            or not math.isfinite(self.init_std)
            or self.init_std < 0
        ):
            raise ConfigError(f"expected init_std a finite float >= 0, got {self.init_std!r}")

    @property
    def area_size(self) -> tuple[int, int]:
        """``(H, W)`` of the area theta covers: the frame, or the patch for ``patch``."""
        if self.kind == "patch":
            return (self.patch_size, self.patch_size)
        return self.frame_size

    @property
    def theta_shape(self) -> tuple[int, int, int]:
        """``(3, R, R)`` when coarse, else ``(3, H, W)`` of :attr:`area_size`."""
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


class Program(nn.Module):
    """A visual program with one learnable parameter ``theta`` (build with :func:`build_program`).

    ``apply(x_t, thetas)`` renders ``P`` candidate parameter tensors in one batch (used by the
    zeroth-order estimators); ``forward(x_t)`` renders the module's own ``theta``. The output is
    always in [0, 1]:

    - ``pad`` / ``patch``: program pixels are ``sigmoid(up(theta))``.
    - ``full``: ``clamp(embed(x_t) + M * tanh(up(theta)), 0, 1)`` (Elsayed et al. 2019), where
      ``embed`` places the image in the centre of a black frame.

    The final clamp passes gradients at the bounds themselves (so an all-zero ``full`` program
    on a black frame still gets a gradient). ``up`` is bilinear upsampling
    (``align_corners=False``) from the coarse grid, a convex combination of grid values, so it
    never enlarges a perturbation.

    Zero-order work over an 8-bit wire: the slope of the sigmoid is at most 1/4 (tanh: 1), so a
    theta perturbation of size ``mu`` moves a pixel by at most ``mu / 4`` (``full``: ``mu``).
    A pixel change below about 1/255 vanishes when the server quantizes the image to uint8. RGF
    directions are unit vectors in ``R^d`` (coordinates ~ ``1/sqrt(d)``), so with ``pad`` the
    smoothing radius needs ``mu >~ 4 * sqrt(d) / 255`` (``d = 192``: ``mu >~ 0.2``); an SPSA
    step ``c_k * D`` (``|D| >= 0.5``) needs ``c_k >~ 8 / 255``.
    """

    theta: nn.Parameter
    inner_mask: Tensor
    overlay_mask: Tensor

    def __init__(self, spec: ProgramSpec, theta: Tensor) -> None:
        super().__init__()
        spec.validate()
        if tuple(theta.shape) != spec.theta_shape:
            raise ConfigError(
                f"expected theta of shape {spec.theta_shape}, got {tuple(theta.shape)}"
            )
        self.spec = spec
        self.input_transform = spec.input_transform()
        self.theta = nn.Parameter(theta.to(torch.float32).clone())
        h, w = spec.frame_size
        inner = spec.inner_size
        self._top, self._left = (h - inner) // 2, (w - inner) // 2
        centre = torch.zeros(h, w, dtype=torch.bool)
        if spec.kind == "patch":
            centre[spec.patch_size :, :] = True
            centre[:, spec.patch_size :] = True
        else:
            centre[self._top : self._top + inner, self._left : self._left + inner] = True
        # inner_mask: True where the (resized) target image shows through (pad / patch).
        self.register_buffer("inner_mask", centre, persistent=False)
        overlay = torch.ones(h, w) if spec.mask == "none" else (~centre).to(torch.float32)
        self.register_buffer("overlay_mask", overlay, persistent=False)

    @property
    def theta_shape(self) -> tuple[int, int, int]:
        """Shape of ``theta``; the ZO dimension is ``d = prod(theta_shape)``."""
        return self.spec.theta_shape

    def _upsample(self, thetas: Tensor) -> Tensor:
        size = self.spec.area_size
        if tuple(thetas.shape[-2:]) == size:
            return thetas
        return F.interpolate(thetas, size=size, mode="bilinear", align_corners=False)

    def _embed(self, x_t: Tensor) -> Tensor:
        """Image in the centre of a black frame: ``[N, 3, H, W]``."""
        h, w = self.spec.frame_size
        inner = self.spec.inner_size
        pad = (self._left, w - inner - self._left, self._top, h - inner - self._top)
        return F.pad(x_t, pad)

    def _check_input(self, x_t: Tensor) -> None:
        inner = self.spec.inner_size
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (3, inner, inner):
            raise DataError(
                f"expected transformed images [N, 3, {inner}, {inner}] (use the program's "
                f"input_transform), got shape {tuple(x_t.shape)}"
            )
        if not x_t.is_floating_point():
            raise DataError(f"expected floating images in [0, 1], got dtype {x_t.dtype}")

    @overload
    def apply(self, x_t: Tensor, thetas: Tensor) -> Tensor: ...

    @overload
    def apply(self, x_t: Callable[[nn.Module], None]) -> Program: ...

    def apply(
        self, x_t: Tensor | Callable[[nn.Module], None], thetas: Tensor | None = None
    ) -> Tensor | Program:
        """Render ``P`` candidates: ``x_t [N,3,inner,inner]``, ``thetas [P,*theta_shape]``.

        Returns ``[P, N, 3, H, W]`` in [0, 1], differentiable in ``thetas``. This name shadows
        ``nn.Module.apply(fn)``; called with a single callable it still does what torch does
        (so ``parent.apply(init_fn)`` keeps working on a model that contains a program).
        """
        if thetas is None:
            if callable(x_t) and not isinstance(x_t, Tensor):
                return super().apply(x_t)
            raise DataError("expected apply(x_t, thetas) with thetas [P, *theta_shape], got none")
        if not isinstance(x_t, Tensor):
            raise DataError(f"expected x_t a tensor, got {type(x_t).__name__}")
        return self.render_candidates(x_t, thetas)

    def render_candidates(self, x_t: Tensor, thetas: Tensor) -> Tensor:
        """Typed form of :meth:`apply`: ``[P, N, 3, H, W]`` in [0, 1]."""
        self._check_input(x_t)
        if thetas.dim() != 4 or tuple(thetas.shape[1:]) != self.theta_shape:
            raise DataError(
                f"expected thetas [P, {', '.join(map(str, self.theta_shape))}], "
                f"got shape {tuple(thetas.shape)}"
            )
        x_t = x_t.to(thetas.dtype)
        up = self._upsample(thetas)
        kind = self.spec.kind
        if kind == "full":
            overlay = self.overlay_mask.to(up.dtype) * torch.tanh(up)
            out = self._embed(x_t)[None] + overlay[:, None]
        elif kind == "pad":
            out = torch.where(self.inner_mask, self._embed(x_t)[None], torch.sigmoid(up)[:, None])
        else:
            h, w = self.spec.frame_size
            p = self.spec.patch_size
            image = _resize(x_t, (h, w))
            patch = F.pad(torch.sigmoid(up), (0, w - p, 0, h - p))
            out = torch.where(self.inner_mask, image[None], patch[:, None])
        return clamp01(out)

    def forward(self, x_t: Tensor) -> Tensor:
        """Render the module's own ``theta``: ``[N, 3, H, W]`` in [0, 1]."""
        return self.render_candidates(x_t, self.theta[None])[0]

    def render(self, images: Tensor) -> Tensor:
        """``forward(input_transform(images))`` for raw uint8 / [0, 1] target images."""
        return self.forward(self.input_transform(images).to(self.theta.device))

    @torch.no_grad()
    def delta(self) -> Tensor:
        """The current program pixels ``[3, H, W]`` (detached), for visualization.

        ``pad``/``patch``: ``sigmoid(up(theta))`` on the program area, 0 where the image shows;
        ``full``: the additive overlay ``M * tanh(up(theta))`` in [-1, 1].
        """
        up = self._upsample(self.theta[None])[0]
        if self.spec.kind == "full":
            return self.overlay_mask * torch.tanh(up)
        h, w = self.spec.frame_size
        prog = torch.sigmoid(up)
        if self.spec.kind == "patch":
            prog = F.pad(prog, (0, w - self.spec.patch_size, 0, h - self.spec.patch_size))
        return torch.where(self.inner_mask, torch.zeros_like(prog), prog)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, d={self.theta.numel()}"


def build_program(spec: ProgramSpec, seed: int = 0) -> Program:
    """Build a :class:`Program`; theta ~ ``N(0, init_std^2)`` from ``torch.Generator(seed)``."""
    spec.validate()
    _check_int("seed", seed, 0)
    theta = torch.zeros(spec.theta_shape)
    if spec.init_std > 0:
        gen = torch.Generator().manual_seed(seed)
        theta = torch.randn(spec.theta_shape, generator=gen) * spec.init_std
    program = Program(spec, theta)
    logger.debug("built %s program, d=%d", spec.kind, theta.numel())
    return program
