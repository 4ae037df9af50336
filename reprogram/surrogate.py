"""A local surrogate model for black-box fits: a transfer prior and a free warm start.

Users nearly always have a public model of the same kind as the API's. With ``--surrogate
MODEL`` (any local model the loader knows) a black-box fit uses it twice, and neither use
costs an API query (the surrogate's images are counted apart, as ``surrogate_images``):

- **prior** (estimator ``prgf``, :mod:`reprogram.prgf`): at every step, the exact gradient of
  the *same objective* (the same program, label map, loss and batch) with the surrogate's
  scores in place of the API's. The surrogate's class ``i`` stands for the API's class ``i``;
  where both name their classes and the names are the same set, the surrogate's scores are
  reordered to the API's order. A surrogate with another number of classes is refused.
- **warm start** (``warm_start_epochs > 0``): a white-box fit of the same program and label map
  on the surrogate first (autograd, the fit's own optimizer settings, the same data split,
  the best epoch chosen on validation accuracy *through the surrogate*), whose parameters
  start the black-box fit.

The surrogate answers with the API's output kind (probabilities or logits; a partial answer's
prior is that of full probabilities) on the API's wire (uint8 images, as an HTTP fit sends).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from reprogram.errors import ConfigError
from reprogram.losses import LossSpec
from reprogram.oracles import LocalOracle, Oracle
from reprogram.zoo.registry import SourceModel, load_model

if TYPE_CHECKING:
    from reprogram.config import FitConfig
    from reprogram.data import TargetDataset
    from reprogram.pipeline import Reprogrammer

log = logging.getLogger(__name__)

__all__ = ["Surrogate", "warm_start"]


class _Reorder(nn.Module):
    """The surrogate's logits in the API's class order."""

    index: Tensor

    def __init__(self, net: nn.Module, index: list[int]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("index", torch.tensor(index), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).index_select(1, self.index)


def _aligned(model: SourceModel, api: Oracle, name: str) -> SourceModel:
    """``model`` with its classes in the API's order; :class:`ConfigError` if they differ."""
    info = api.info
    ours, theirs = model.meta.class_names, tuple(info.class_names)
    if len(ours) != info.num_classes:
        raise ConfigError(f"expected a surrogate with the API's {info.num_classes} classes, "
                          f"got {name!r} with {len(ours)}: the prior is the gradient through "
                          "the same label map, which needs the same source classes")
    if ours == theirs or set(ours) != set(theirs):
        if set(ours) != set(theirs):
            log.info("surrogate %s: class names differ from the API's; class i stands for "
                     "class i", name)
        return model
    index = [ours.index(c) for c in theirs]
    return SourceModel(_Reorder(model.module, index), model.meta, model.differentiable)


class Surrogate:
    """The surrogate as an oracle, and the prior gradient it gives."""

    def __init__(self, name: str, api: Oracle) -> None:
        model = load_model(name)
        if not model.differentiable:
            raise ConfigError(f"expected a surrogate with autograd (a torch model), got "
                              f"{name!r} (ONNX runs outside torch)")
        if api.info.fingerprint.get("weights_sha256") == model.meta.weights_sha256:
            log.warning("surrogate %s has the API's own weights: the prior is the exact "
                        "gradient up to the wire (a white-box fit would need no queries)", name)
        output = "logits" if api.info.base_kind == "logits" else "probs"
        self.name = name
        self.oracle = LocalOracle(_aligned(model, api, name), output=output, wire="uint8",
                                  device=api.device)

    @property
    def images_used(self) -> int:
        return self.oracle.images_used

    def gradient(self, model: Reprogrammer, x_t: Tensor, labels: Tensor, loss: LossSpec,
                 theta: Tensor) -> Tensor:
        """The exact gradient at ``theta`` of the objective with the surrogate's scores."""
        objective = model.objective(x_t, labels, self.oracle, loss=loss)
        thetas = theta.detach().clone()[None].requires_grad_(True)
        value = objective(thetas)[0]
        (grad,) = torch.autograd.grad(value, thetas, allow_unused=True)
        return torch.zeros_like(theta) if grad is None else grad[0].detach()


def warm_start(cfg: FitConfig, surrogate: Surrogate, data: TargetDataset
               ) -> dict[str, Tensor]:
    """The state (program and label map) of a white-box fit on the surrogate: the same
    program, map, split and optimizer settings, ``cfg.warm_start_epochs`` epochs, the best
    epoch on validation through the surrogate."""
    from reprogram.fit import fit

    # autograd on the surrogate's scores: CMA-ES's mean-setting step and label votes belong
    # to the black-box fit, so the warm start steps Adam and reads the surrogate's scores
    optimizer = "adam" if cfg.optimizer == "cma" else cfg.optimizer
    white = replace(cfg, estimator="autograd", optimizer=optimizer, label_votes=1,
                    surrogate=None, warm_start_epochs=0, epochs=cfg.warm_start_epochs,
                    budget=None, checkpoint=None)
    result = fit(white, surrogate.oracle, data, evaluate_test=False)
    log.info("warm start on %s: validation accuracy %.3f through the surrogate after %d "
             "steps", surrogate.name, result.best_val_accuracy, result.steps)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}
