"""Visual Prompt Tuning's token prompts (Jia et al., ECCV 2022) on a frozen vision transformer.

VPT prepends ``N`` learned tokens to the token sequence of a frozen ViT, after the class token:
in the first layer only (*shallow*: ``[N, D]``, carried through every block like the others) or
in every layer (*deep*: ``[L, N, D]``, layer ``i``'s tokens replace the previous layer's output
at their positions before block ``i``; Sec. 3.2). Prompt tokens get no position embedding. The
tokens need the model's insides, so they are white-box: a local model, or the model owner's
server. :class:`TokenSpec` is their geometry as artifacts record it; :func:`vit_adapter` runs a
ViT the loader knows (the zoo's :class:`~reprogram.zoo.vit.ShapesViT` and torchvision's
``VisionTransformer`` family) with tokens, and answers the class token's final representation
(for VPT's linear head) or the model's own logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from reprogram.errors import ConfigError, ModelError, check_int, spec_fields

TokenDepth = Literal["shallow", "deep"]


@dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """The geometry of a token prompt and of the ViT it was learned on.

    Attributes:
        depth: ``shallow`` (tokens enter before the first block) or ``deep`` (every block).
        tokens: N, the prompt length (0: no tokens, the frozen model as it is).
        layers: L, the number of encoder blocks of the ViT.
        width: D, the ViT's token width.
        patch: the ViT's patch side (VPT's initialization reads it).
    """

    depth: TokenDepth
    tokens: int
    layers: int
    width: int
    patch: int

    def __post_init__(self) -> None:
        if self.depth not in get_args(TokenDepth):
            raise ConfigError(f"expected token depth in {get_args(TokenDepth)}, got "
                              f"{self.depth!r}")
        check_int("tokens", self.tokens, 0)
        for name in ("layers", "width", "patch"):
            check_int(name, getattr(self, name), 1)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, D)`` shallow, ``(L, N, D)`` deep."""
        if self.depth == "shallow":
            return (self.tokens, self.width)
        return (self.layers, self.tokens, self.width)

    def initial(self, seed: int) -> Tensor:
        """VPT's initialization: uniform in ``+-sqrt(6 / (3 * patch^2 + D))`` (Xavier uniform
        over the patch embedding's fan-in and fan-out; KMnP-lab/VPT
        ``src/models/vit_prompt/vit.py``, ``PromptedTransformer.__init__``)."""
        bound = math.sqrt(6.0 / (3 * self.patch * self.patch + self.width))
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand(self.shape, generator=gen) * 2 - 1) * bound

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenSpec:
        return cls(**spec_fields("TokenSpec", d, cls.__dataclass_fields__, tuple(
            cls.__dataclass_fields__)))

    def check_model(self, adapter: ViTAdapter, where: str = "the model") -> None:
        """Raise :class:`ModelError` naming what does not fit ``adapter``'s ViT."""
        mine = {"layers": self.layers, "width": self.width, "patch": self.patch}
        theirs = {"layers": adapter.layers, "width": adapter.width, "patch": adapter.patch}
        wrong = [f"{k} {mine[k]} (the model has {theirs[k]})" for k in mine
                 if mine[k] != theirs[k]]
        if wrong:
            raise ModelError(f"expected a ViT with the token prompt's geometry on {where}, "
                             f"got a mismatch: {', '.join(wrong)}")


class ViTAdapter(Protocol):
    """How to run one ViT architecture with prompt tokens."""

    layers: int
    width: int
    patch: int

    def features(self, x: Tensor, prompts: Tensor | None) -> Tensor:
        """The class token's final representation ``[N, D]`` for images in [0, 1]."""
        ...

    def head(self, features: Tensor) -> Tensor:
        """The source classifier's logits from :meth:`features`."""
        ...


def insert_prompts(h: Tensor, prompts: Tensor | None, block: int, n_prev: int) -> Tensor:
    """Put block ``block``'s prompt tokens after the class token (VPT Sec. 3.2)."""
    if prompts is None or (prompts.dim() == 2 and block > 0):
        return h
    layer = prompts[block] if prompts.dim() == 3 else prompts
    rest = h[:, 1 + n_prev :]
    return torch.cat([h[:, :1], layer.to(h.dtype).expand(h.shape[0], -1, -1), rest], dim=1)


class _Adapter:
    def __init__(self, normalize: nn.Module, net: Any, layers: int, width: int,
                 patch: int) -> None:
        self.normalize, self.net = normalize, net  # net: the architecture's own module
        self.layers, self.width, self.patch = layers, width, patch


class _ShapesViTAdapter(_Adapter):
    def features(self, x: Tensor, prompts: Tensor | None) -> Tensor:
        return self.net.forward_tokens(self.normalize(x), prompts)

    def head(self, features: Tensor) -> Tensor:
        return self.net.head(features)


class _TorchvisionViTAdapter(_Adapter):
    """torchvision ``VisionTransformer.forward`` with tokens inserted before each block."""

    def features(self, x: Tensor, prompts: Tensor | None) -> Tensor:
        net = self.net
        h = net._process_input(self.normalize(x))
        h = torch.cat([net.class_token.expand(h.shape[0], -1, -1), h], dim=1)
        enc = net.encoder
        h = enc.dropout(h + enc.pos_embedding)
        p = 0 if prompts is None else prompts.shape[-2]
        for i, layer in enumerate(enc.layers):
            h = layer(insert_prompts(h, prompts, i, p if i > 0 else 0))
        return enc.ln(h)[:, 0]

    def head(self, features: Tensor) -> Tensor:
        return self.net.heads(features)


def vit_adapter(module: nn.Module) -> ViTAdapter:
    """The adapter of a loaded source model (``Sequential(Normalize, net)``) whose ``net`` is
    a ViT the loader knows; :class:`ModelError` otherwise, naming what works."""
    from torchvision.models import VisionTransformer

    from reprogram.zoo.vit import ShapesViT

    parts = list(module.children()) if isinstance(module, nn.Sequential) else []
    net = parts[-1] if len(parts) == 2 else module
    normalize = parts[0] if len(parts) == 2 else nn.Identity()
    if isinstance(net, ShapesViT):
        patch = int(net.patch_embed.kernel_size[0])
        return _ShapesViTAdapter(normalize, net, net.depth, net.dim, patch)
    if isinstance(net, VisionTransformer):
        return _TorchvisionViTAdapter(normalize, net, len(net.encoder.layers), net.hidden_dim,
                                      net.patch_size)
    raise ModelError(f"expected a vision transformer for token prompts (the zoo's shapes-vit "
                     f"or torchvision's vit_* with a state dict), got {type(net).__name__}; "
                     f"pixel programs (--program full, expand, ...) work on any model")
