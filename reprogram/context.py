"""CoOp's context vectors (Zhou et al., IJCV 2022) for a zero-shot vision-language model.

CoOp learns the words of the text prompt: ``[V]_1 .. [V]_M [CLASS].`` with M continuous
vectors in the text encoder's token-embedding space, one set shared by every class
(*unified*, ``coop``: ``[M, W]``) or one per class (*class-specific*, ``coop-csc``:
``[K, M, W]``), the class name at the end; the class logits are the scaled cosines of the
image's feature with each prompt's text feature, and only the context vectors learn.
:class:`ContextSpec` is their geometry as artifacts record it. CoOp learns them white-box on a
local model; BPT-VLM's text half (preset ``bpt-vlm``) searches them with CMA-ES through a
server's ``context`` input (:mod:`server.zero_shot`); both query through
:meth:`reprogram.oracles.Oracle.query_context`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from reprogram.errors import ConfigError, check_int, spec_fields

CONTEXT_KINDS = ("coop", "coop-csc")
# KaiyangZhou/CoOp trainers/coop.py, PromptLearner.__init__ (random initialization):
# nn.init.normal_(ctx_vectors, std=0.02)
INIT_STD = 0.02
CONTEXT_NEEDS_WEIGHTS = (
    "CoOp's context vectors enter the text encoder: fit them on a local vision-language model "
    "(--model shapes-clip), or through an endpoint whose zero-shot model takes a 'context' "
    "input (reprogram-server --context-input); otherwise learn a pixel prompt against its "
    "zero-shot API (--program full, or add-pad)")


@dataclass(frozen=True, kw_only=True)
class ContextSpec:
    """The geometry of CoOp's context and of the text encoder it was learned on.

    Attributes:
        context: M, the number of context vectors.
        width: W, the text encoder's token-embedding width.
        classes: K for class-specific context (one set per class), None for unified.
    """

    context: int
    width: int
    classes: int | None = None

    def __post_init__(self) -> None:
        check_int("context", self.context, 1)
        check_int("width", self.width, 1)
        if self.classes is not None:
            check_int("classes", self.classes, 1)

    @property
    def kind(self) -> str:
        return "coop" if self.classes is None else "coop-csc"

    @property
    def shape(self) -> tuple[int, ...]:
        """``(M, W)`` unified, ``(K, M, W)`` class-specific."""
        if self.classes is None:
            return (self.context, self.width)
        return (self.classes, self.context, self.width)

    def initial(self, seed: int) -> Tensor:
        """CoOp's random initialization, ``N(0, 0.02^2)``, from ``torch.Generator(seed)``."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.shape, generator=gen) * INIT_STD

    def check_model(self, width: int, classes: int) -> None:
        """Raise :class:`ConfigError` naming what does not fit the model and class list."""
        if width != self.width:
            raise ConfigError(f"expected a text encoder of token width {self.width}, got one of"
                              f" {width}")
        if self.classes is not None and classes != self.classes:
            raise ConfigError(f"expected {self.classes} classes for class-specific context,"
                              f" got {classes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContextSpec:
        return cls(**spec_fields("ContextSpec", d, cls.__dataclass_fields__,
                                 ("context", "width")))


def context_spec(kind: str, context: int, width: int, classes: int) -> ContextSpec:
    if kind not in CONTEXT_KINDS:
        raise ConfigError(f"expected a context kind in {CONTEXT_KINDS}, got {kind!r}")
    return ContextSpec(context=context, width=width,
                       classes=classes if kind == "coop-csc" else None)
