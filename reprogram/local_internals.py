"""What a local oracle does with a model's insides: VPT's tokens in a ViT, and a
vision-language model's classes and CoOp context (the white-box hooks of
:class:`~reprogram.oracles.Oracle`, implemented for :class:`~reprogram.oracles.LocalOracle`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from reprogram.errors import ConfigError

if TYPE_CHECKING:
    from reprogram.tokens import ViTAdapter
    from reprogram.vocabulary import Vocabulary
    from reprogram.zoo.registry import SourceModel


class LocalInternals:
    """Mixed into :class:`~reprogram.oracles.LocalOracle` (whose fields it reads)."""

    model: SourceModel
    vocabulary: Vocabulary | None
    max_batch: int
    _device: torch.device
    _output: str
    _adapter: ViTAdapter | None
    _slot_of: torch.Tensor
    _fingerprint: dict[str, object]
    _cached: Any

    def _wire(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def zero_shot(self) -> bool:
        from reprogram.vlm import is_zero_shot

        return is_zero_shot(self.model.module)

    def use_labels(self, names: tuple[str, ...], template: str | None = None) -> None:
        from reprogram.vlm import with_classes

        if not self.zero_shot:
            super().use_labels(names, template)  # type: ignore[misc]
        current: Any = self.model.module
        if tuple(names) == current.class_names and template in (None, current.template):
            return  # already these classes: a hosted prompt sets its own before every query
        model = with_classes(self.model, tuple(names), template)
        self.model = _source(model.module.to(self._device), model.meta, model.differentiable)
        self._slot_of = torch.full((model.meta.num_classes,), -1, dtype=torch.long)
        self._fingerprint = model.meta.fingerprint()
        self._cached = None

    def context_width(self) -> int:
        if not self.zero_shot or not self.model.differentiable:
            from reprogram.context import CONTEXT_NEEDS_WEIGHTS

            raise ConfigError(f"expected a local vision-language model for context vectors,"
                              f" got {self.model.meta.name!r}; {CONTEXT_NEEDS_WEIGHTS}")
        module: Any = self.model.module
        return int(module.context_width)

    def _query_context(self, x: torch.Tensor, contexts: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
        if self.vocabulary is not None:
            raise ConfigError("expected probs, logits, topk or label answers for context "
                              "vectors, got class names")
        x = self._wire(x.to(self._device))
        module: Any = self.model.module
        out = [_reduce(module.context_logits(x[i : i + self.max_batch], contexts[j : j + 1]
                                                   .to(self._device)), self._output)
               for j in range(contexts.shape[0]) for i in range(0, x.shape[0], self.max_batch)]
        order = torch.cat(out)
        return order, 1


    def token_adapter(self) -> ViTAdapter:
        if self._adapter is None:
            from reprogram.tokens import vit_adapter

            if not self.model.differentiable:
                raise ConfigError("expected a torch model for token prompts, got one without "
                                  "its layers (ONNX); load the ViT as a state dict")
            self._adapter = vit_adapter(self.model.module)
        return self._adapter

    def _query_tokens(self, adapter: ViTAdapter, x: torch.Tensor, tokens: torch.Tensor,
                      features: bool) -> tuple[torch.Tensor, int]:
        if self.vocabulary is not None:
            raise ConfigError("expected probs, logits, topk or label answers for token "
                              "prompts, got class names")
        x = self._wire(x.to(self._device))
        out = []
        for prompt in tokens.to(self._device):
            for i in range(0, x.shape[0], self.max_batch):
                f = adapter.features(x[i : i + self.max_batch], prompt)
                out.append(f if features else _reduce(adapter.head(f), self._output))
        return torch.cat(out), 1


def _source(module: torch.nn.Module, meta: Any, differentiable: bool) -> SourceModel:
    from reprogram.zoo.registry import SourceModel

    return SourceModel(module, meta, differentiable)


def _reduce(logits: torch.Tensor, kind: str) -> torch.Tensor:
    from reprogram.oracles import reduce_scores

    return reduce_scores(logits, kind)
