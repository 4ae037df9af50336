"""A small CLIP-style model for the zoo (``shapes-clip``): image and text encoders, one space.

Radford et al. (2021): an image encoder and a text encoder map into one ``embed``-dimensional
space; a class's logit is the cosine of the image's and the class prompt's features times a
learned scale. Here the image encoder is a small CNN (the default model's stacks, its last
feature map flattened so that place survives) and the text encoder a small transformer over
*characters*, so any class name encodes, mean-pooled over its tokens (CLIP pools a causal
transformer at the end-of-text token; at this size the mean learns faster).

:meth:`ShapesCLIP.encode_text` takes optional context vectors in token-embedding space (CoOp,
Zhou et al. 2022): ``[M, W]`` shared by every class, or ``[K, M, W]`` one set per class,
placed after the start token where the template's words would be: ``[SOT] [V]_1 .. [V]_M
name . [EOT]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprogram.errors import ConfigError
from reprogram.zoo.net import ShapesNet

ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,'-_/()&+"
PAD, SOT, EOT, UNK, CTX = 0, 1, 2, 3, 4
OFFSET = 5  # character ids start here
MAX_TEXT = 96  # tokens, start and end included (the longest caption is 82 characters)
MAX_LABEL_CHARS = 48


def tokenize(texts: list[str] | tuple[str, ...], *, context: int = 0) -> Tensor:
    """Character ids ``[K, MAX_TEXT]``: ``SOT``, ``context`` ``CTX`` slots (CoOp's vectors
    go there), the lower-cased text (unknown characters as ``UNK``), ``EOT``, padding."""
    rows = []
    room = MAX_TEXT - 2 - context
    for text in texts:
        chars = text.lower()
        if len(chars) > room:
            raise ConfigError(f"expected a text of at most {room} characters, got"
                              f" {len(chars)}: {text[:40]!r}...")
        ids = [SOT, *([CTX] * context), *(OFFSET + ALPHABET.index(c) if c in ALPHABET else UNK
                                          for c in chars), EOT]
        rows.append(ids + [PAD] * (MAX_TEXT - len(ids)))
    return torch.tensor(rows, dtype=torch.long).view(len(rows), MAX_TEXT)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    """Character ids (and optional context vectors) -> text features ``[K, embed]``: a
    pre-norm transformer over the tokens (padding masked), mean-pooled over them."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, embed: int = 64) -> None:
        super().__init__()
        self.width = width
        self.token = nn.Embedding(OFFSET + len(ALPHABET), width)
        self.position = nn.Parameter(torch.randn(MAX_TEXT, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed, bias=False)

    def forward(self, ids: Tensor, context: Tensor | None = None) -> Tensor:
        used = ids != PAD
        t = int(used.sum(1).max()) if len(ids) else 1  # the padding at the end is unread
        ids, used = ids[:, :t], used[:, :t]
        x = self.token(ids)
        if context is not None:
            slots = ids == CTX
            m = context.shape[-2]
            if not bool((slots.sum(1) == m).all()):
                raise ConfigError(f"expected {m} context slots in every text (tokenize with"
                                  f" context={m}), got {slots.sum(1).tolist()}")
            ctx = context.expand(ids.shape[0], -1, -1) if context.dim() == 2 else context
            x = torch.cat([x[:, :1], ctx.to(x), x[:, 1 + m:]], dim=1)
        x = x + self.position[:t]
        for block in self.blocks:
            x = block(x, ~used)
        weights = used.to(x.dtype).unsqueeze(-1)
        pooled = (self.ln(x) * weights).sum(1) / weights.sum(1)
        return self.proj(pooled)


class ImageEncoder(nn.Module):
    """Normalized images ``[N, 3, 32, 32]`` -> image features ``[N, embed]``."""

    def __init__(self, width: int = 24, embed: int = 64, image_size: int = 32) -> None:
        super().__init__()
        self.features = ShapesNet(width=width).features
        side = image_size // 8
        self.proj = nn.Linear(4 * width * side * side, embed)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.features(x).flatten(1))


class ShapesCLIP(nn.Module):
    """Both encoders and the learned logit scale (CLIP's, initialised at 1 / 0.07)."""

    def __init__(self, width: int = 24, text_width: int = 64, embed: int = 64) -> None:
        super().__init__()
        self.image = ImageEncoder(width, embed)
        self.text = TextEncoder(text_width, embed=embed)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07)

    @property
    def context_width(self) -> int:
        """The width of a context vector (the text encoder's token embedding)."""
        return self.text.width

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, ids: Tensor, context: Tensor | None = None) -> Tensor:
        return F.normalize(self.text(ids, context), dim=-1)

    def encode_names(self, names: tuple[str, ...] | list[str], template: str) -> Tensor:
        """Class features ``[K, embed]`` of the prompts ``template.format(name)``."""
        return self.encode_text(tokenize([template.format(n) for n in names]))

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=4.6052).exp()  # CLIP clips the scale at 100

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """``[N, K]``: the scaled cosines of each image with each class prompt."""
        return self.scale() * image_features @ text_features.t()
