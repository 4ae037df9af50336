"""One implementation of "apply the program, query the oracle, map the labels".

:class:`Reprogrammer` is shared by the fit loop (which asks it for an objective), by
``reprogram eval`` / ``reprogram apply`` and by the servers that host prompts, so a prompt
predicts identically wherever it is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprogram.errors import ConfigError
from reprogram.estimators import Objective
from reprogram.labelmaps import (
    LabelMap,
    LabelMapScore,
    Remainder,
    to_log_scores,
    top_prob_matrix,
)
from reprogram.losses import LossSpec
from reprogram.oracles import Oracle
from reprogram.programs import ContextProgram, Program, TokenProgram

DEFAULT_FLOOR = 1e-6


class Reprogrammer(nn.Module):
    """A program and a label map in front of an oracle: target images in, target logits out."""

    def __init__(self, program: Program, labelmap: LabelMap, *, floor: float = DEFAULT_FLOOR,
                 remainder: Remainder = "floor", weight_penalty: float = 0.0) -> None:
        super().__init__()
        self.program = program
        self.labelmap = labelmap
        self.floor = floor
        self.remainder: Remainder = remainder  # what a top-k answer's missing classes get
        self.weight_penalty = weight_penalty  # Elsayed et al.'s lambda in + lambda * ||W||^2

    def log_scores(self, scores: Tensor, oracle: Oracle) -> Tensor:
        """What the oracle revealed as log-scores (:func:`reprogram.labelmaps.to_log_scores`)."""
        info = oracle.info
        return to_log_scores(scores, info.base_kind, self.floor, self.remainder,
                             classes=info.active_classes)

    def transform(self, images: Tensor) -> Tensor:
        """Raw target images (uint8 or [0,1]) -> the program's input ``[N,3,inner,inner]``."""
        return self.program.input_transform(images).to(self.program.theta.device)

    def candidate_logits(self, x_t: Tensor, thetas: Tensor, oracle: Oracle,
                         log_probs: bool = False, noise: Tensor | None = None) -> Tensor:
        """Target logits ``[P, N, K_t]`` for P candidate programs, in ONE oracle query;
        ``log_probs=True`` normalizes the source scores first, so a discrete map returns the
        log of its mean source probability (what BAR's focal loss reads). ``noise``
        ``[V, 3, H, W]`` queries every frame V times with each noise added and averages the
        answers (label votes, :mod:`reprogram.votes`)."""
        answers = self._answers(x_t, thetas, oracle, noise)
        return self._target_logits(answers, oracle, log_probs).view(
            thetas.shape[0], x_t.shape[0], -1)

    def _answers(self, x_t: Tensor, thetas: Tensor, oracle: Oracle,
                 noise: Tensor | None = None) -> Tensor:
        """What the oracle answers for every (candidate, image) pair, ``[P * N, K]``: source
        scores, or a ViT's class-token features for the ``head`` map."""
        frames = self.program.render_candidates(x_t, thetas)
        p, n = frames.shape[:2]
        if isinstance(self.program, ContextProgram):
            if noise is not None or self.labelmap.reads_features:
                raise ConfigError("expected no label votes and no head label map with"
                                  " context vectors (coop)")
            return oracle.query_context(frames[0], thetas)
        if isinstance(self.program, TokenProgram):
            if noise is not None:
                raise ConfigError("expected no label votes with token prompts")
            return oracle.query_tokens(frames[0], thetas, features=self.labelmap.reads_features)
        if self.labelmap.reads_features:
            raise ConfigError("expected a token program (vpt-shallow, vpt-deep) for the head "
                              "label map; pixel programs read the source scores")
        if noise is None:
            return oracle.query(frames.flatten(0, 1))
        noisy = frames[:, :, None] + noise.to(frames)[None, None]
        scores = oracle.query(noisy.flatten(0, 2))
        return scores.view(p * n, noise.shape[0], -1).mean(dim=1)

    def _target_logits(self, answers: Tensor, oracle: Oracle, log_probs: bool = False) -> Tensor:
        if self.labelmap.reads_features:
            return self.labelmap(answers)
        log_scores = self.log_scores(answers, oracle)
        if log_probs:
            log_scores = F.log_softmax(log_scores, dim=-1)
        return self.labelmap(log_scores, oracle.info.active_classes)

    def objective(self, x_t: Tensor, labels: Tensor, oracle: Oracle,
                  loss: LossSpec | None = None, noise: Tensor | None = None) -> Objective:
        """Mean loss per candidate (cross-entropy unless ``loss`` says otherwise, plus
        ``weight_penalty * ||theta||^2``), ``thetas [P,...] -> losses [P]``; ``noise`` as in
        :meth:`candidate_logits`."""
        spec = loss or LossSpec()

        def losses(thetas: Tensor) -> Tensor:
            logits = self.candidate_logits(x_t, thetas, oracle, log_probs=spec.needs_log_probs,
                                           noise=noise)
            p, n = logits.shape[:2]
            target = labels.to(logits.device).repeat(p)
            per_sample = spec(logits.flatten(0, 1), target)
            loss = per_sample.view(p, n).mean(dim=1)
            if self.weight_penalty:
                loss = loss + self.weight_penalty * thetas.pow(2).flatten(1).sum(1)
            return loss

        return losses

    @torch.no_grad()
    def source_scores(self, images: Tensor, oracle: Oracle, batch_size: int = 256) -> Tensor:
        """Source scores ``[N, K_s]`` of raw target images under the current program (a
        ViT's class-token features ``[N, D]`` for the ``head`` map)."""
        theta = self.program.theta.detach()[None]
        out = [self._answers(self.transform(images[i : i + batch_size]), theta, oracle)
               for i in range(0, len(images), batch_size)]
        width = self.labelmap.spec.num_source
        return torch.cat(out) if out else torch.zeros(0, width)

    @torch.no_grad()
    def predict_logits(self, images: Tensor, oracle: Oracle, batch_size: int = 256) -> Tensor:
        """Target logits ``[N, K_t]`` of raw target images (uint8 or [0,1])."""
        return self._target_logits(self.source_scores(images, oracle, batch_size), oracle)

    @torch.no_grad()
    def predict_proba(self, images: Tensor, oracle: Oracle, batch_size: int = 256) -> Tensor:
        """Target class probabilities ``[N, K_t]``."""
        return F.softmax(self.predict_logits(images, oracle, batch_size), dim=-1)

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, oracle: Oracle,
                 batch_size: int = 256) -> float:
        """Top-1 target accuracy; 0.0 on an empty set."""
        if len(labels) == 0:
            return 0.0
        pred = self.predict_logits(images, oracle, batch_size).argmax(-1)
        return float((pred.cpu() == labels.cpu()).float().mean())

    @torch.no_grad()
    def fit_labelmap(self, images: Tensor, labels: Tensor, oracle: Oracle,
                     batch_size: int = 256, score: LabelMapScore = "top1") -> None:
        """Frequency label mapping under the current program: on top-1 counts (ILM-VP), or
        on the mean top-k probability (``score="top-prob"``, BAR's code)."""
        scores = self.source_scores(images, oracle, batch_size)
        if score == "top1":
            self.labelmap.fit(scores.argmax(-1).cpu(), labels.cpu())
            return
        probs = F.softmax(self.log_scores(scores, oracle), dim=-1)
        self.labelmap.fit_matrix(top_prob_matrix(probs.cpu(), labels.cpu(),
                                                 self.labelmap.spec.num_target))
