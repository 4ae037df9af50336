"""Vision-language models as source models: zero-shot classification over any class names.

A CLIP-style model classifies an image among class *names* it is given: each name goes
through a text template (``"a photo of a {}."``), the text encoder gives one feature per
class, and the logits are the scaled cosines with the image's feature (Radford et al. 2021).
:class:`ZeroShotClassifier` is that classifier as a frozen ``nn.Module`` (images in [0, 1],
logits out), so every pixel program, estimator and oracle of the library runs on it
unchanged; its classes are the target task's, set by :func:`with_classes` (the fit loop does
it from the data set, ``eval``/``apply`` from the prompt), so no label map is needed: the
identity (``first``) reads class k as target class k (BlackVIP, Bahng et al.).

CoOp (Zhou et al. 2022) replaces the template's words by M learned context vectors in the text
encoder's token-embedding space: ``[SOT] [V]_1 .. [V]_M name . [EOT]``, one set shared by
every class (unified) or one per class (class-specific, ``[K, M, W]``);
:meth:`ZeroShotClassifier.context_logits` computes the logits under candidate contexts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from reprogram.errors import ConfigError, ModelError
from reprogram.zoo.clip import MAX_LABEL_CHARS, ShapesCLIP, tokenize
from reprogram.zoo.net import Normalize

DEFAULT_TEMPLATE = "a photo of a {}."
MAX_LABELS = 1000


def check_labels(names: list[str] | tuple[str, ...], template: str = DEFAULT_TEMPLATE) -> None:
    """Raise :class:`ConfigError` for a class list a zero-shot model cannot take."""
    if not names:
        raise ConfigError("expected at least one class name, got none")
    if len(names) > MAX_LABELS:
        raise ConfigError(f"expected at most {MAX_LABELS} class names, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"expected non-empty class names, got {name!r}")
        if len(name) > MAX_LABEL_CHARS:
            raise ConfigError(f"expected class names of at most {MAX_LABEL_CHARS} characters,"
                              f" got {len(name)}: {name[:40]!r}...")
    if template.count("{}") != 1:
        raise ConfigError(f"expected a template with one '{{}}' for the class name, got"
                          f" {template!r}")


class ZeroShotClassifier(nn.Module):
    """A frozen CLIP-style model over a list of class names: ``[N,3,H,W]`` in [0,1] ->
    logits ``[N, K]``."""

    text_features: Tensor

    def __init__(self, clip: ShapesCLIP, mean: tuple[float, ...], std: tuple[float, ...],
                 class_names: tuple[str, ...], template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__()
        check_labels(class_names, template)
        self.clip = clip
        self.normalize = Normalize(mean, std)
        self.class_names = tuple(class_names)
        self.template = template
        with torch.no_grad():
            features = clip.encode_names(class_names, template)
        self.register_buffer("text_features", features, persistent=False)

    @property
    def context_width(self) -> int:
        return self.clip.context_width

    def image_features(self, x: Tensor) -> Tensor:
        return self.clip.encode_image(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.clip.logits(self.image_features(x), self.text_features)

    def context_features(self, context: Tensor) -> Tensor:
        """Class features ``[K, D]`` under CoOp context vectors ``[M, W]`` or ``[K, M, W]``."""
        return context_text_features(self.clip, self.class_names, context)

    def context_logits(self, x: Tensor, contexts: Tensor) -> Tensor:
        """Logits ``[P * N, K]`` of images ``x`` under each of P contexts ``[P, ...]``."""
        image = self.image_features(x)
        return torch.cat([self.clip.logits(image, self.context_features(c)) for c in contexts])


def context_text_features(clip: ShapesCLIP, names: tuple[str, ...] | list[str],
                          context: Tensor) -> Tensor:
    """Class features ``[K, D]`` of CoOp's prompts ``[V]_1 .. [V]_M name.`` with the context
    vectors ``[M, W]`` (unified) or ``[K, M, W]`` (class-specific) in the ``[V]`` slots."""
    ids = tokenize([f"{n}." for n in names], context=int(context.shape[-2]))
    return clip.encode_text(ids, context)


def is_zero_shot(module: nn.Module) -> bool:
    return isinstance(module, ZeroShotClassifier)


def with_classes(model: Any, class_names: tuple[str, ...],
                 template: str | None = None) -> Any:
    """The :class:`~reprogram.zoo.registry.SourceModel` of a zero-shot model over
    ``class_names`` (and ``template``, default the model's)."""
    from reprogram.zoo.registry import SourceModel

    module = model.module
    if not is_zero_shot(module):
        raise ModelError(f"expected a zero-shot (vision-language) model, got {model.meta.name!r}"
                         f" with fixed classes")
    template = template or module.template
    head = ZeroShotClassifier(module.clip, tuple(module.normalize.mean.flatten().tolist()),
                              tuple(module.normalize.std.flatten().tolist()),
                              tuple(class_names), template)
    head.eval()
    extra = {**model.meta.extra, "zero_shot": True, "template": template}
    return SourceModel(head, replace(model.meta, class_names=tuple(class_names), extra=extra),
                       model.differentiable)


def bind_prompt_labels(oracle: Any, prompt: Any) -> None:
    """A zero-shot oracle classifies among a prompt's target classes with its recorded
    template (a no-op for other oracles): what ``eval``, ``apply`` and hosting do before a
    prompt queries."""
    if oracle.zero_shot:
        template = prompt.source.get("template")
        oracle.use_labels(tuple(prompt.target_classes), str(template) if template else None)
