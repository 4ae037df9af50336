"""BlackVIP's Coordinator: an input-dependent visual prompt (Oh et al., CVPR 2023, section 3.1).

A frozen pretrained *encoder* maps each image to a feature ``z``; a small *decoder* turns
``[z, p_trigger]`` (a learnable "prompt trigger" vector shared by every image) into a prompt
of the frame's size, and the model receives ``clamp(x + eps * prompt, 0, 1)``. Only the
decoder and the trigger are learned (by SPSA-GC in BlackVIP); ``theta`` is their flat vector,
so every estimator in :mod:`reprogram.estimators` applies unchanged.

The parts follow changdaeoh/BlackVIP ``trainers/visual_prompters.py``:

- ``Coordinator.forward``: the encoder runs without gradients and its [CLS] feature (the
  input of the classifier's last linear layer here: a CNN's pooled feature, a ViT's class
  token) is ``z``; ``DecoderManual(shared_feature)`` concatenates ``z`` with ``p_trigger``
  (``torch.nn.init.uniform_(a=0.0, b=0.1)``) and reshapes the cube to ``[N, C, g, g]``.
- ``DecoderManual`` (``arch='vit-base'``): five stages of a grouped 2x2 stride-2 transposed
  convolution and a 1x1 transposed convolution (no bias), each followed by BatchNorm and GELU,
  channels ``C -> 64 -> 64 -> 32 -> 32 -> 16 -> 3``; the first stage is grouped by
  ``min(C, 64)``. Five doublings take BlackVIP's ``7 x 7`` cube to 224 pixels; on another frame
  the cube is ``ceil(H / 32) x ceil(W / 32)`` and the prompt is centre-cropped to the frame.
- ``SRC_DIM`` (configs/trainers/BLACKVIP/vit_b16.yaml: 1568 = 32 x 7 x 7 for ``z`` of 768):
  the cube's channels ``C`` default to the smallest power of two >= 16 whose cube holds ``z``
  twice, which gives BlackVIP's 32 channels at its own setting.
- BatchNorm runs in training mode (batch statistics, running averages updated once per
  evaluated candidate, in order) while a fit estimates a gradient, and in evaluation mode
  (the running averages, saved in the artifact) for validation, test and serving, as BlackVIP's
  trainer switches ``set_model_mode("train")`` / ``("eval")``.
- ``P_EPS`` (1.0 in CLIP's normalized space) is ``eps`` here, in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from reprogram.errors import ConfigError, DataError, ModelError, check_int, spec_fields

__all__ = ["CoordinatorSpec", "Decoder", "encoder_features", "load_encoder", "resolve"]

STAGES = 5  # doublings from the cube to the prompt (7 -> 224 in BlackVIP)
TRIGGER_INIT = (0.0, 0.1)  # visual_prompters.py: torch.nn.init.uniform_(p_trigger, 0.0, 0.1)


@dataclass(frozen=True, kw_only=True)
class CoordinatorSpec:
    """What a Coordinator program needs besides its frame (JSON-safe via ``to_dict``).

    Attributes:
        encoder: the frozen encoder, a model name :func:`reprogram.zoo.registry.load_model`
            resolves (``default``, ``torchvision:ARCH`` with a state dict, a model path).
        encoder_sha256: its weights' fingerprint; loading checks it, so a prompt never runs
            with an encoder it was not learned with.
        feature_dim: the width of the encoder's feature ``z``.
        channels: the cube's channels ``C`` (BlackVIP ``SRC_DIM / 49``).
        eps: the prompt's scale in pixels (BlackVIP ``P_EPS``).
    """

    encoder: str
    encoder_sha256: str
    feature_dim: int
    channels: int
    eps: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError(f"expected the coordinator's encoder a model name, got "
                              f"{self.encoder!r}")
        if not isinstance(self.encoder_sha256, str):
            raise ConfigError("expected the coordinator's encoder_sha256 a string")
        check_int("feature_dim", self.feature_dim, 1)
        c = check_int("channels", self.channels, 1)
        if (c < 64 and 64 % c) or (c >= 64 and c % 64):
            raise ConfigError(f"expected channels dividing 64 or a multiple of 64 (the first "
                              f"stage is grouped by min(C, 64)), got {c}")
        if (isinstance(self.eps, bool) or not isinstance(self.eps, int | float)
                or not math.isfinite(self.eps) or self.eps <= 0):
            raise ConfigError(f"expected eps a finite number > 0, got {self.eps!r}")

    def grid(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """The cube's spatial size on a frame: ``ceil(side / 32)`` each way."""
        return (math.ceil(frame_size[0] / 2**STAGES), math.ceil(frame_size[1] / 2**STAGES))

    def trigger_dim(self, frame_size: tuple[int, int]) -> int:
        gh, gw = self.grid(frame_size)
        return self.channels * gh * gw - self.feature_dim

    def check_frame(self, frame_size: tuple[int, int]) -> None:
        if self.trigger_dim(frame_size) < 1:
            gh, gw = self.grid(frame_size)
            raise ConfigError(f"expected a cube of {self.channels} x {gh} x {gw} larger than "
                              f"the encoder's feature ({self.feature_dim}); raise channels")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoordinatorSpec:
        kwargs = spec_fields("CoordinatorSpec", d, cls.__dataclass_fields__,
                             ("encoder", "encoder_sha256", "feature_dim", "channels"))
        return cls(**kwargs)


def default_channels(feature_dim: int, frame_size: tuple[int, int]) -> int:
    """The smallest power of two >= 16 whose cube holds ``feature_dim`` twice (BlackVIP's
    ``SRC_DIM`` 1568 = 32 x 49 for its 768-wide feature)."""
    gh, gw = CoordinatorSpec(encoder="-", encoder_sha256="", feature_dim=1,
                             channels=16).grid(frame_size)
    c = 16
    while c * gh * gw < 2 * feature_dim:
        c *= 2
    return c


def last_linear(module: nn.Module) -> nn.Linear:
    """The classifier's last linear layer, whose input is the feature ``z``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("expected an encoder with a final linear layer (its input is the "
                         "Coordinator's feature), got a model with none; name a torch model "
                         "(the zoo's default, a torchvision architecture, TorchScript)")
    return linears[-1]


@torch.no_grad()
def encoder_features(encoder: nn.Module, frames: Tensor) -> Tensor:
    """``z [N, D]``: the input of the encoder's last linear layer for frames in [0, 1]."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0].detach())

    head = last_linear(encoder)
    handle = head.register_forward_pre_hook(hook)
    try:
        encoder(frames.to(head.weight.dtype))
    finally:
        handle.remove()
    z = captured[-1]
    return z.flatten(1).to(frames.dtype)


@lru_cache(maxsize=4)
def _load(name: str) -> tuple[nn.Module, str, tuple[int, int]]:
    from reprogram.zoo.registry import load_model

    model = load_model(name)
    if not model.differentiable:
        raise ModelError(f"expected a torch model as the Coordinator's encoder, got {name!r} "
                         "(ONNX runs outside torch)")
    return model.module, model.meta.weights_sha256, model.meta.input_size


def load_encoder(name: str, sha256: str | None = None) -> nn.Module:
    """The frozen encoder ``name``; :class:`ModelError` if its weights are not ``sha256``."""
    module, digest, _ = _load(name)
    if sha256 is not None and digest != sha256:
        raise ModelError(f"expected the Coordinator's encoder {name!r} with weights sha256 "
                         f"{sha256}, got {digest}: the prompt was learned with another encoder")
    return module


def resolve(encoder: str, frame_size: tuple[int, int], eps: float = 1.0,
            channels: int | None = None) -> CoordinatorSpec:
    """A :class:`CoordinatorSpec` for ``encoder`` on a frame: loads it once to read its
    feature width and fingerprint."""
    module, digest, size = _load(encoder)
    probe = torch.full((1, 3, *size), 0.5)
    dim = encoder_features(module, probe).shape[1]
    spec = CoordinatorSpec(encoder=encoder, encoder_sha256=digest, feature_dim=dim,
                           channels=channels or default_channels(dim, frame_size), eps=eps)
    spec.check_frame(frame_size)
    return spec


def _body(channels: int) -> nn.Sequential:
    """DecoderManual's body for ``arch='vit-base'`` (see the module docstring)."""
    g = 64 if channels >= 64 else channels
    layers: list[nn.Module] = [nn.ConvTranspose2d(channels, 64, 2, 2, 0, groups=g),
                               nn.ConvTranspose2d(64, 64, kernel_size=1, bias=False),
                               nn.BatchNorm2d(64), nn.GELU()]
    for cin, cout in ((64, 32), (32, 32), (32, 16)):
        layers += [nn.ConvTranspose2d(cin, cin, 2, 2, 0, groups=cin),
                   nn.ConvTranspose2d(cin, cout, kernel_size=1, bias=False),
                   nn.BatchNorm2d(cout), nn.GELU()]
    layers.append(nn.ConvTranspose2d(16, 3, 2, 2, 0, bias=False))
    return nn.Sequential(*layers)


@lru_cache(maxsize=16)
def theta_dim(spec: CoordinatorSpec, frame_size: tuple[int, int]) -> int:
    """The length of ``theta``: the trigger and the body's parameters."""
    body = sum(p.numel() for p in _body(spec.channels).parameters())
    return spec.trigger_dim(frame_size) + body


class Decoder:
    """The decoder as a function of the flat ``theta = [p_trigger, body parameters]`` (the
    order of BlackVIP's ``parameters_to_vector(coordinator.dec.parameters())``).

    The body module holds no state of its own that matters: its parameters are replaced by
    slices of ``theta`` and its BatchNorm buffers by the ones passed to :meth:`__call__`.
    """

    def __init__(self, spec: CoordinatorSpec, frame_size: tuple[int, int]) -> None:
        spec.check_frame(frame_size)
        self.spec, self.frame_size = spec, frame_size
        self.body = _body(spec.channels)
        self.trigger = spec.trigger_dim(frame_size)
        self.shapes = [(name, p.shape) for name, p in self.body.named_parameters()]
        self.dim = self.trigger + sum(math.prod(s) for _, s in self.shapes)

    def initial(self, seed: int) -> Tensor:
        """BlackVIP's initial theta: ``p_trigger ~ U(0, 0.1)`` then torch's default layer
        initialization, drawn from ``torch.manual_seed(seed)`` in that order."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trigger = torch.empty(self.trigger).uniform_(*TRIGGER_INIT)
            body = _body(self.spec.channels)
        vec = nn.utils.parameters_to_vector(body.parameters()).detach()
        return torch.cat([trigger, vec])

    def buffers(self) -> dict[str, Tensor]:
        """Fresh BatchNorm buffers (running mean 0, variance 1), by body name."""
        return {name: b.detach().clone() for name, b in _body(self.spec.channels).named_buffers()}

    def __call__(self, theta: Tensor, z: Tensor, buffers: dict[str, Tensor],
                 train: bool) -> Tensor:
        """The prompt ``[N, 3, H, W]`` for features ``z [N, D]`` (uncropped cube doublings
        centre-cropped to the frame)."""
        n = z.shape[0]
        params: dict[str, Tensor] = {}
        offset = self.trigger
        for name, shape in self.shapes:
            size = math.prod(shape)
            params[name] = theta[offset : offset + size].view(shape)
            offset += size
        trigger = theta[: self.trigger][None].expand(n, -1)
        gh, gw = self.spec.grid(self.frame_size)
        cube = torch.cat([z.to(theta.dtype), trigger], dim=1).view(n, -1, gh, gw)
        self.body.train(train)
        out = functional_call(self.body, {**params, **buffers}, (cube,))
        h, w = self.frame_size
        top, left = (out.shape[2] - h) // 2, (out.shape[3] - w) // 2
        return out[:, :, top : top + h, left : left + w]


@contextmanager
def training(flag: list[bool]) -> Iterator[None]:
    """Set ``flag[0]`` for the duration (a fit's gradient estimate)."""
    old = flag[0]
    flag[0] = True
    try:
        yield
    finally:
        flag[0] = old


def check_features(z: Tensor, spec: CoordinatorSpec) -> None:
    if z.dim() != 2 or z.shape[1] != spec.feature_dim:
        raise DataError(f"expected encoder features of width {spec.feature_dim}, got shape "
                        f"{tuple(z.shape)}")
