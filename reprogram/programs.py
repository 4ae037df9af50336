"""Visual programs: compose a (resized) target image into the source model's input frame.

The kinds and their sources are listed in :mod:`reprogram.program_spec` (and DESIGN.md
section 3): ``expand`` (ILM-VP), ``add-pad`` / ``add-patch`` (Bahng et al.), ``mask`` (Elsayed
et al.), ``patch`` and ``full``; ``pad`` is the deprecated alias of ``expand``.

Coarse parameterization (``resolution=R``): theta lives on an ``R x R`` grid that is bilinearly
upsampled (``align_corners=False``) to the frame, as AutoZOOM does for black-box attacks. This is
what makes zeroth-order optimization affordable: the ZO dimension is ``d = 3 * R * R``. On a
non-square frame the grid keeps the frame's aspect: ``R`` cells along the shorter side and
``round(R * long / short)`` along the longer, so a cell covers the same area at any frame size.

Placement (every frame size, square or not): the target image is resized (bilinear, antialiased
when shrinking, aspect not kept) to an ``inner x inner`` square and centred in the frame; an odd
margin puts the extra pixel at the bottom and right (``top = (H - inner) // 2``). Sizes are
fractions of the frame, not pixels: the fit's defaults are ``inner = min(H, W)`` for ``full``
and the full-image kinds, ``min(H, W) // 2`` for ``expand`` and ``mask``, and a patch of
``min(H, W) // 4``; AutoVP's input-scaling search (:mod:`reprogram.scaling`) picks ``inner`` on
validation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprogram import coordinator as coord
from reprogram.errors import ConfigError, DataError, check_int
from reprogram.pixels import clamp01
from reprogram.program_spec import (
    KIND_ALIASES,
    InputTransform,
    MaskKind,
    ProgramKind,
    ProgramSpec,
    _resize,
    grid_shape,
)

__all__ = [
    "KIND_ALIASES",
    "CoordinatorProgram",
    "InputTransform",
    "MaskKind",
    "Program",
    "ProgramKind",
    "ProgramSpec",
    "TokenProgram",
    "build_program",
    "grid_shape",
]

logger = logging.getLogger(__name__)


class Program(nn.Module):
    """A visual program with one learnable parameter ``theta`` (build with :func:`build_program`).

    ``apply(x_t, thetas)`` renders ``P`` candidate parameter tensors in one batch (used by the
    zeroth-order estimators); ``forward(x_t)`` renders the module's own ``theta``. The output is
    always in [0, 1]:

    - ``expand`` / ``patch``: program pixels are ``sigmoid(up(theta))``.
    - ``add-pad`` / ``add-patch``: ``clamp(image + M * up(theta), 0, 1)`` on the full-size image.
    - ``mask``: ``(1 + tanh(up(theta))) / 2`` around the embedded image (Elsayed et al. 2019).
    - ``full``: ``clamp(embed(x_t) + M * tanh(up(theta)), 0, 1)``, where ``embed`` places the
      image in the centre of a black frame.

    The final clamp passes gradients at the bounds themselves (so an all-zero ``full`` program
    on a black frame still gets a gradient). ``up`` is bilinear upsampling
    (``align_corners=False``) from the coarse grid, a convex combination of grid values, so it
    never enlarges a perturbation.

    Zero-order work over an 8-bit wire: the slope of the sigmoid is at most 1/4 (tanh: 1), so a
    theta perturbation of size ``mu`` moves a pixel by at most ``mu / 4`` (``full``: ``mu``).
    A pixel change below about 1/255 vanishes when the server quantizes the image to uint8. RGF
    directions are unit vectors in ``R^d`` (coordinates ~ ``1/sqrt(d)``), so with ``expand`` the
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
        p = spec.patch_size
        if spec.kind in ("patch", "add-patch"):
            centre[p:, :] = True
            centre[:, p:] = True
        elif spec.kind == "add-pad":
            centre[p : h - p, p : w - p] = True
        else:
            centre[self._top : self._top + inner, self._left : self._left + inner] = True
        # inner_mask: True where the target image shows through unchanged.
        self.register_buffer("inner_mask", centre, persistent=False)
        everywhere = spec.kind == "full" and spec.mask == "none"
        overlay = torch.ones(h, w) if everywhere else (~centre).to(torch.float32)
        self.register_buffer("overlay_mask", overlay, persistent=False)

    def fitting(self) -> ContextManager[None]:
        """The context of a fit's gradient estimate (a no-op except for ``coordinator``)."""
        return nullcontext()

    @property
    def theta_shape(self) -> tuple[int, ...]:
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
        if thetas.dim() != 1 + len(self.theta_shape) or tuple(thetas.shape[1:]) != self.theta_shape:
            raise DataError(
                f"expected thetas [P, {', '.join(map(str, self.theta_shape))}], "
                f"got shape {tuple(thetas.shape)}"
            )
        x_t = x_t.to(thetas.dtype)
        prog = self._pixels(self._upsample(thetas))[:, None]
        kind = self.spec.kind
        if kind in ("full", "add-pad", "add-patch"):
            out = self._image(x_t)[None] + prog
        else:
            out = torch.where(self.inner_mask, self._image(x_t)[None], prog)
        return clamp01(out)

    def _image(self, x_t: Tensor) -> Tensor:
        """The image in the frame: embedded in the centre, or resized to fill the frame."""
        if self.spec.kind in ("add-pad", "add-patch", "patch"):
            return _resize(x_t, self.spec.frame_size)
        return self._embed(x_t)

    def _pixels(self, up: Tensor) -> Tensor:
        """The program's own pixels (``[P, 3, H, W]``): an additive overlay for ``full`` and the
        ``add-*`` kinds, the pixels that replace the image's elsewhere."""
        kind = self.spec.kind
        if kind in ("patch", "add-patch"):
            h, w = self.spec.frame_size
            p = self.spec.patch_size
            prog = torch.sigmoid(up) if kind == "patch" else up
            return F.pad(prog, (0, w - p, 0, h - p))
        mask = self.overlay_mask.to(up.dtype)
        if kind == "full":
            return mask * torch.tanh(up)
        if kind == "add-pad":
            return mask * up
        if kind == "mask":
            return (1.0 + torch.tanh(mask * up)) / 2.0
        return torch.sigmoid(up)

    def forward(self, x_t: Tensor) -> Tensor:
        """Render the module's own ``theta``: ``[N, 3, H, W]`` in [0, 1]."""
        return self.render_candidates(x_t, self.theta[None])[0]

    def render(self, images: Tensor) -> Tensor:
        """``forward(input_transform(images))`` for raw uint8 / [0, 1] target images."""
        return self.forward(self.input_transform(images).to(self.theta.device))

    @torch.no_grad()
    def delta(self) -> Tensor:
        """The current program pixels ``[3, H, W]`` (detached), for visualization.

        ``expand``/``patch``/``mask``: the program's pixels, 0 where the image shows;
        ``full``/``add-*``: the additive overlay (``full``: in [-1, 1]).
        """
        prog = self._pixels(self._upsample(self.theta[None]))[0]
        if self.spec.kind in ("full", "add-pad", "add-patch"):
            return prog
        return torch.where(self.inner_mask, torch.zeros_like(prog), prog)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, d={self.theta.numel()}"


class CoordinatorProgram(Program):
    """BlackVIP's input-dependent prompt (:mod:`reprogram.coordinator`):
    ``clamp(x + eps * decoder(encoder(x)), 0, 1)`` on the full-size image.

    ``theta`` is the decoder's flat vector; the BatchNorm running averages are buffers of this
    module (so checkpoints, the best-on-validation snapshot and artifacts carry them). Inside
    :meth:`fitting` BatchNorm uses batch statistics and updates the averages once per rendered
    candidate; elsewhere it uses the averages. :meth:`delta` draws the prompt of a mid-grey
    image (the prompt depends on the image).
    """

    def __init__(self, spec: ProgramSpec, theta: Tensor) -> None:
        super().__init__(spec, theta)
        assert spec.coordinator is not None  # validated by ProgramSpec
        self.coord = spec.coordinator
        self.decoder = coord.Decoder(spec.coordinator, spec.frame_size)
        # encoder and decoder body are not submodules: theta and the buffers are the state.
        # The encoder is loaded (and its fingerprint checked) now, except when the program is
        # built on the meta device only to check an artifact's tensor shapes.
        self._encoder: list[nn.Module] = []
        if torch.get_default_device().type != "meta":
            self._encoder.append(coord.load_encoder(spec.coordinator.encoder,
                                                    spec.coordinator.encoder_sha256))
        self._buffer_names: dict[str, str] = {}
        for name, value in self.decoder.buffers().items():
            local = "bn_" + name.replace(".", "_")
            self.register_buffer(local, value)
            self._buffer_names[name] = local
        self._fitting = [False]

    def fitting(self) -> ContextManager[None]:
        return coord.training(self._fitting)

    def features(self, frames: Tensor) -> Tensor:
        """The frozen encoder's features ``z [N, D]`` of frames in [0, 1]."""
        if not self._encoder:
            raise ConfigError("this coordinator program was built on the meta device; build "
                              "it on a real one to render")
        encoder = self._encoder[0].to(frames.device)
        z = coord.encoder_features(encoder, frames)
        coord.check_features(z, self.coord)
        return z

    def _prompts(self, frames: Tensor, thetas: Tensor) -> Tensor:
        z = self.features(frames.detach())
        buffers = {name: getattr(self, local) for name, local in self._buffer_names.items()}
        train = self._fitting[0]
        return torch.stack([self.decoder(t, z, buffers, train) for t in thetas])

    def render_candidates(self, x_t: Tensor, thetas: Tensor) -> Tensor:
        self._check_input(x_t)
        if thetas.dim() != 2 or tuple(thetas.shape[1:]) != self.theta_shape:
            raise DataError(f"expected thetas [P, {self.theta_shape[0]}], got shape "
                            f"{tuple(thetas.shape)}")
        frames = _resize(x_t.to(thetas.dtype), self.spec.frame_size)
        return clamp01(frames[None] + self.coord.eps * self._prompts(frames, thetas))

    @torch.no_grad()
    def delta(self) -> Tensor:
        grey = torch.full((1, 3, *self.spec.frame_size), 0.5, device=self.theta.device)
        return (self.coord.eps * self._prompts(grey, self.theta.detach()[None]))[0, 0]


class TokenProgram(Program):
    """VPT's prompt tokens (``vpt-shallow``, ``vpt-deep``): ``theta`` is the tokens
    (:class:`~reprogram.tokens.TokenSpec`), no pixel changes, and the image fills the frame;
    the oracle reads the tokens (:meth:`reprogram.oracles.Oracle.query_tokens`)."""

    def render_candidates(self, x_t: Tensor, thetas: Tensor) -> Tensor:
        """The frames ``[P, N, 3, H, W]``, the same for every candidate."""
        if tuple(thetas.shape[1:]) != self.theta_shape:
            raise DataError(f"expected thetas [P, {', '.join(map(str, self.theta_shape))}], "
                            f"got shape {tuple(thetas.shape)}")
        return self.frames(x_t)[None].expand(thetas.shape[0], -1, -1, -1, -1)

    def frames(self, x_t: Tensor) -> Tensor:
        """The image resized to fill the frame, ``[N, 3, H, W]`` in [0, 1]."""
        self._check_input(x_t)
        return clamp01(_resize(x_t.to(self.theta.dtype), self.spec.frame_size))

    @torch.no_grad()
    def delta(self) -> Tensor:
        """No pixel changes: zeros ``[3, H, W]``."""
        return torch.zeros(3, *self.spec.frame_size, device=self.theta.device)


class ContextProgram(TokenProgram):
    """CoOp's context vectors (``coop``, ``coop-csc``): ``theta`` is the context
    (:class:`~reprogram.context.ContextSpec`), no pixel changes, the image fills the frame;
    the oracle reads the context (:meth:`reprogram.oracles.Oracle.query_context`)."""


def build_program(spec: ProgramSpec, seed: int = 0) -> Program:
    """Build a :class:`Program`; theta ~ ``N(0, init_std^2)`` from ``torch.Generator(seed)``
    (``coordinator``: BlackVIP's initialization from ``seed``)."""
    spec.validate()
    check_int("seed", seed, 0)
    if spec.coordinator is not None:
        decoder = coord.Decoder(spec.coordinator, spec.frame_size)
        return CoordinatorProgram(spec, decoder.initial(seed))
    if spec.tokens is not None:
        return TokenProgram(spec, spec.tokens.initial(seed))
    if spec.context is not None:
        return ContextProgram(spec, spec.context.initial(seed))
    theta = torch.zeros(spec.theta_shape)
    if spec.init_std > 0:
        gen = torch.Generator().manual_seed(seed)
        theta = torch.randn(spec.theta_shape, generator=gen) * spec.init_std
    program = Program(spec, theta)
    logger.debug("built %s program, d=%d", spec.kind, theta.numel())
    return program
