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


def test_exclude_seen_masks_history_but_never_the_target():
    from cprec.metrics import exclude_seen

    scores = torch.arange(6 * 3, dtype=torch.float32).view(3, 6)  # higher id, higher score
    target = torch.tensor([1, 2, 0])
    seen = [np.array([5, 4, 1]), [], np.array([0, 3, 3])]  # row 0 saw its target; row 2 repeats
    out = exclude_seen(scores, seen, target)
    assert torch.isinf(out[0, [4, 5]]).all() and out[0, 1] == scores[0, 1]  # the target keeps its score
    assert torch.equal(out[1], scores[1])
    assert torch.isinf(out[2, 3]) and out[2, 0] == scores[2, 0]
    assert torch.equal(~torch.isinf(out), torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 1, 1]]).bool())
    # Masking others can only lift the target: rank 4 -> 2 in row 0 (items 2, 3 remain above).
    assert target_ranks(scores, target)[0] == 4 and target_ranks(out, target)[0] == 2


def test_leave_one_out_keeps_the_whole_history_as_seen():
    seq = [str(i) for i in range(12)]
    data = build_dataset([seq, ["a", "b", "c"]], max_len=4)
    tokens = data.item_tokens
    for examples, held in ((data.valid, 2), (data.test, 1)):
        seen = [[tokens[i] for i in s] for s in examples.seen]
        assert seen[0] == seq[:-held]  # longer than max_len: all of it, not the last 4
        assert seen[1] == ["a", "b", "c"][:-held]


def test_evaluate_exclude_seen_lifts_popularity_on_histories_of_popular_items():
    from cprec.models import PopularityModel
    from cprec.train import evaluate

    # Every user watched the two most popular items and one of three mid ones first; the
    # test target is another mid one, below the popular items the user already saw.
    seqs = [["p1", "p2", f"t{u % 3}", f"x{u}", f"t{(u + 1) % 3}"] for u in range(30)]
    data = build_dataset(seqs, max_len=5)
    model = PopularityModel(data.num_items, data.counts)
    plain = evaluate(model, data.test, exclude_seen=False)
    masked = evaluate(model, data.test, exclude_seen=True)
    assert masked["NDCG@10"] > plain["NDCG@10"]
    assert all(masked[k] >= plain[k] for k in plain)
