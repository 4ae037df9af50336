"""A small vision transformer for the zoo (``shapes-vit``), with room for prompt tokens.

Patch embedding, a class token, learned position embeddings and pre-norm encoder blocks
(Dosovitskiy et al., 2021). ``forward_tokens`` takes optional prompt tokens: shallow prompts
``[P, D]`` are inserted after the class token before the first block; deep prompts
``[L, P, D]`` replace the previous layer's prompt tokens before every block (Jia et al., 2022,
Sec. 3.2). The prompt tokens get no position embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from reprogram.tokens import insert_prompts


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` ``[T]`` (True: ignored as a key) hides tokens from the others."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, key_padding_mask=_batch_mask(key_mask, x))[0]
        return x + self.mlp(self.ln2(x))


def _batch_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.unsqueeze(0).expand(x.shape[0], -1)


class ShapesViT(nn.Module):
    """Normalized images ``[N, 3, S, S]`` -> logits ``[N, num_classes]``."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 64,
        image_size: int = 32,
        patch: int = 4,
        depth: int = 6,
        heads: int = 4,
    ) -> None:
        super().__init__()
        dim = width
        self.dim, self.depth = dim, depth
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1) + self.pos_embed

    def forward_tokens(self, x: torch.Tensor, prompts: torch.Tensor | None = None,
                       mask_prompts: bool = False) -> torch.Tensor:
        """The class token's final representation ``[N, dim]`` with optional prompt tokens.

        ``mask_prompts`` hides the prompt tokens from every other token (as keys): the output
        is then the model's own, which the tests use to check the injection."""
        h = self.embed(x)
        t = h.shape[1]
        p = 0 if prompts is None else prompts.shape[-2]
        mask = None
        if prompts is not None and mask_prompts:
            mask = torch.zeros(t + p, dtype=torch.bool, device=h.device)
            mask[1 : 1 + p] = True
        for i, block in enumerate(self.blocks):
            h = block(insert_prompts(h, prompts, i, p if i > 0 else 0), mask)
        return self.norm(h[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_tokens(x))
