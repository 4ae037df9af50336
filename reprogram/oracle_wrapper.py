"""An oracle seen through another (:class:`OracleWrapper`): its own counts and budget, the
inner oracle's model; subclasses observe or change the queries (fault injection in the tests,
a surrogate's view)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reprogram.oracles import ModelInfo, Oracle

if TYPE_CHECKING:
    from reprogram.tokens import ViTAdapter


class OracleWrapper(Oracle):
    """An oracle seen through another: delegates everything to ``inner`` and keeps its own
    counts and budget. Subclasses override :meth:`_query` to observe or change queries."""

    def __init__(self, inner: Oracle, *, budget: int | None = None,
                 max_requests: int | None = None) -> None:
        super().__init__(budget=budget, max_requests=max_requests)
        self.inner = inner

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    @property
    def differentiable(self) -> bool:
        return self.inner.differentiable

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.inner._query(x)

    def token_adapter(self) -> ViTAdapter:
        return self.inner.token_adapter()

    @property
    def zero_shot(self) -> bool:
        return self.inner.zero_shot

    def context_width(self) -> int:
        return self.inner.context_width()

    def _query_context(self, x: torch.Tensor, contexts: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
        return self.inner._query_context(x, contexts)

    def use_labels(self, names: tuple[str, ...], template: str | None = None) -> None:
        self.inner.use_labels(names, template)

    def _query_tokens(self, adapter: ViTAdapter, x: torch.Tensor, tokens: torch.Tensor,
                      features: bool) -> tuple[torch.Tensor, int]:
        return self.inner._query_tokens(adapter, x, tokens, features)
