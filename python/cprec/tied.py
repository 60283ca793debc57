"""Tied adaptive ends (fairseq's tied adaptive input and softmax).

The adaptive softmax reuses the block-wise embedding's item tables and, optionally,
its projections. Layouts (d the model width, block j of n_j items and width d_j):

* input block j: table ``E_j`` [n_j, d_j], projection ``P_j`` [d, d_j] (the head,
  block 0, has d_0 = d and no projection unless ``head_projection``);
* output: head weight [c1 + n_tails, d], tail j projection ``Q_j`` [d_j, d] and
  table ``F_j`` [n_j, d_j].

Tied: the head weight's first c1 rows are ``E_0``, ``F_j = E_j`` and (with
``tie_projections``) ``Q_j = P_j^T``. The n_tails cluster-token rows of the head stay
this module's own parameters and are concatenated to ``E_0`` at each call, so the
gradient reaches both.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding


class TiedAdaptiveSoftmax(AdaptiveSoftmax):
    """An ``AdaptiveSoftmax`` whose item rows (and optionally tail projections) are
    those of ``embedding``; same ``forward``/``log_prob``/``topk`` (hidden: [N, d]).

    Own parameters: ``cluster_weight`` [n_tails, d] and, unless ``tie_projections``,
    ``tail_projections`` [d_j, d]. The embedding is referenced, not registered, so its
    parameters belong to (and are counted once in) the input layer.
    """

    def __init__(self, embedding: BlockwiseEmbedding, tie_projections: bool = False, backend=None) -> None:
        # Not AdaptiveSoftmax.__init__: that would make item tables this module owns.
        nn.Module.__init__(self)
        self.cutoffs = list(embedding.cutoffs)
        self.in_features, self.div_value, self.backend = embedding.embedding_dim, embedding.div_value, backend
        self.tie_projections = tie_projections
        self._embedding = (embedding,)
        d, n_tails = self.in_features, len(self.cutoffs) - 1
        if embedding.weights[0].shape[1] != d:
            raise ValueError(f"the head table must be [c1, {d}] to tie, got {tuple(embedding.weights[0].shape)}")
        self.head_bias = None
        self.cluster_weight = nn.Parameter(torch.empty(n_tails, d))
        self.tail_projections = (
            None if tie_projections
            else nn.ParameterList(nn.Parameter(torch.empty(p.shape[1], d)) for p in embedding.tail_projections)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init for what this module owns; the tables keep the embedding's.
        for w in (self.cluster_weight, *(self.tail_projections or ())):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    @property
    def head_weight(self) -> torch.Tensor:
        """[c1 + n_tails, d]: E_0 then the cluster-token rows."""
        return torch.cat([self._embedding[0].weights[0], self.cluster_weight])

    @property
    def tail_weights(self) -> list:
        return list(self._embedding[0].weights[1:])

    def _projections(self) -> list:
        if self.tail_projections is None:
            return [p.t() for p in self._embedding[0].tail_projections]
        return list(self.tail_projections)

    def _params(self) -> tuple:
        return self.head_weight, None, self._projections(), self.tail_weights, self.cutoffs

    def untied(self) -> AdaptiveSoftmax:
        """A plain ``AdaptiveSoftmax`` holding a copy of the current (tied) values."""
        plain = AdaptiveSoftmax(self.in_features, self.cutoffs, self.div_value, backend=self.backend)
        plain = plain.to(device=self.cluster_weight.device, dtype=self.cluster_weight.dtype)
        with torch.no_grad():
            head, _, projections, tables, _ = self._params()
            plain.head_weight.copy_(head)
            for mine, theirs in zip(projections + tables, [*plain.tail_projections, *plain.tail_weights]):
                theirs.copy_(mine)
        return plain

    def to_torch(self) -> nn.AdaptiveLogSoftmaxWithLoss:
        return self.untied().to_torch()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tied to the input embedding, tie_projections={self.tie_projections}"
