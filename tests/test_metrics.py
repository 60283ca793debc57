"""Metric values on hand-built ranks, and the leave-one-out split on real data: the
held-out items are each user's last two and never train."""
import csv
import math
import os

import numpy as np
import pytest
import torch

from cprec.data import build_dataset, read_sequences
from cprec.metrics import KS, MetricAccumulator, metric_names, metric_sums, target_ranks

V = 37


def _scores_with_rank(rank: int, target: int, ties: int = 0) -> torch.Tensor:
    """Scores [V] where exactly ``rank`` other items score above ``target``, ``ties`` of
    them equal to it (ties count as above: the ranking is pessimistic)."""
    scores = torch.rand(V, dtype=torch.float64) * 0.5  # all below the target's 0.75
    others = [i for i in torch.randperm(V).tolist() if i != target]
    scores[target] = 0.75
    for i in others[: rank - ties]:
        scores[i] = 0.9
    for i in others[rank - ties : rank]:
        scores[i] = 0.75
    return scores


def _expected(rank: int, k: int) -> dict:
    hit = rank < k
    return {"MRR": 1 / (rank + 1) if hit else 0.0, "HR": 1.0 if hit else 0.0,
            "NDCG": 1 / math.log2(rank + 2) if hit else 0.0}


@pytest.mark.parametrize("rank,ties", [(0, 0), (1, 0), (4, 0), (5, 0), (9, 0), (10, 0), (19, 0), (20, 0), (3, 3),
                                       (7, 2), (V - 1, 0)])
def test_metrics_of_one_target_at_a_known_rank(rank, ties):
    target = int(torch.randint(V, ()))
    scores = _scores_with_rank(rank, target, ties)[None]
    assert target_ranks(scores, torch.tensor([target])).tolist() == [rank]
    sums = metric_sums(torch.tensor([rank]))
    for k in KS:
        for name, value in _expected(rank, k).items():
            assert sums[f"{name}@{k}"] == pytest.approx(value, abs=1e-12), (name, k)


def test_all_equal_scores_get_no_credit():
    scores = torch.zeros(3, V, dtype=torch.float64)
    ranks = target_ranks(scores, torch.tensor([0, 5, V - 1]))
    assert ranks.tolist() == [V - 1] * 3


def test_accumulated_means_over_batches_and_the_name_order():
    ranks = [0, 1, 4, 5, 12, 30, 2]
    targets = torch.randint(V, (len(ranks),))
    scores = torch.stack([_scores_with_rank(r, int(t)) for r, t in zip(ranks, targets)])
    acc = MetricAccumulator()
    acc.add(scores[:3], targets[:3])
    acc.add(scores[3:], targets[3:])
    result = acc.result()
    assert list(result) == metric_names() == [f"{m}@{k}" for m in ("MRR", "HR", "NDCG") for k in KS]
    for k in KS:
        for name in ("MRR", "HR", "NDCG"):
            mean = sum(_expected(r, k)[name] for r in ranks) / len(ranks)
            assert result[f"{name}@{k}"] == pytest.approx(mean, abs=1e-12)


def _last_two_by_time(path):
    """Each user's last two items by (timestamp, file order), users in order of first
    appearance: read with the csv module, apart from cprec's reader."""
    events = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows)  # user_id:token item_id:token rating:float timestamp:float
        for order, (user, item, _, ts) in enumerate(rows):
            events.setdefault(user, []).append((float(ts), order, item))
    return [[item for _, _, item in sorted(e)[-2:]] for e in events.values()]


def test_leave_one_out_holds_out_each_users_last_two_items(shared_data):
    path = os.path.join(shared_data, "ml-100k", "ml-100k.inter")
    sequences = read_sequences(path)
    data = build_dataset(sequences, split="leave-one-out", max_len=50)
    tokens = np.array(data.item_tokens)
    last_two = _last_two_by_time(path)
    assert len(last_two) == len(data.valid) == len(data.test) == len(sequences)
    valid, test = data.valid.targets[:, -1], data.test.targets[:, -1]
    assert [list(p) for p in zip(tokens[valid], tokens[test])] == last_two
    prefixes = data.prefixes
    bounds = np.append(np.unique(prefixes.starts), len(prefixes.items))
    assert len(bounds) - 1 == len(sequences)
    for u in range(len(sequences)):
        trained = set(prefixes.items[bounds[u] : bounds[u + 1]].tolist())
        assert valid[u] not in trained and test[u] not in trained, u
        assert data.test.inputs[u, -1] == valid[u]  # the test history ends with the validation item
    # the windows train exactly the prefix targets, nothing held out
    assert int((data.train.targets != data.pad).sum()) == len(prefixes)
