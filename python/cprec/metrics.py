"""Full-ranking top-k metrics on the last position: MRR@k, HR@k (= Recall@k with one
target) and NDCG@k."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

KS = (5, 10, 20)
NAMES = ("MRR", "HR", "NDCG")


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items.  scores: [N, V], target: [N] -> [N].

    Pessimistic on ties: every other item scoring at least as high ranks above, so a
    model that scores everything equal gets no credit.
    """
    t = scores.gather(1, target.unsqueeze(1))
    return (scores >= t).sum(dim=1) - 1


def exclude_seen(scores: torch.Tensor, seen: Sequence, target: torch.Tensor) -> torch.Tensor:
    """scores [N, V] with -inf at each row's seen items other than its target.

    seen: per row, the item ids the user interacted with before the target (any
    integer sequence). The target keeps its score even when it was seen before, so on
    data with repeat consumption a repeated target still competes with the unseen items.
    """
    V = scores.shape[1]
    width = max((len(s) for s in seen), default=0)
    if width == 0:
        return scores
    index = torch.full((scores.shape[0], width), V, dtype=torch.long)
    for row, items in enumerate(seen):
        index[row, : len(items)] = torch.as_tensor(items, dtype=torch.long)
    # Column V takes the padding and is dropped afterwards.
    masked = torch.nn.functional.pad(scores, (0, 1)).scatter(1, index.to(scores.device), float("-inf"))[:, :V]
    return masked.scatter(1, target.unsqueeze(1), scores.gather(1, target.unsqueeze(1)))


def metric_names(ks: Sequence[int] = KS) -> List[str]:
    """Metric names grouped by metric: MRR@5, MRR@10, ..., HR@5, ..., NDCG@20; every
    table and result dict (one process or many) uses this order."""
    return [f"{m}@{k}" for m in NAMES for k in ks]


def metric_sums(ranks: torch.Tensor, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Sums (not means) over the rows, so batches can be added up; keys in ``metric_names`` order."""
    r = ranks.double()
    out = {}
    for k in ks:
        hit = r < k
        out[f"MRR@{k}"] = float(torch.where(hit, 1.0 / (r + 1), 0.0).sum())
        out[f"HR@{k}"] = float(hit.sum())
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2), 0.0).sum())
    return {name: out[name] for name in metric_names(ks)}


class MetricAccumulator:
    """Adds up metric sums over batches; ``result()`` gives the means."""

    def __init__(self, ks: Sequence[int] = KS) -> None:
        self.ks, self.count, self.sums = tuple(ks), 0, {}

    def add(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        for name, value in metric_sums(target_ranks(scores, target), self.ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += target.shape[0]

    def result(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("no examples were evaluated")
        return {name: value / self.count for name, value in self.sums.items()}
