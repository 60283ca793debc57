"""The cpu backend's adaptive-softmax loss that saves its softmax statistics
(csrc/cpu/adaptive_softmax.cpp, ``adaptive_softmax_loss_stats_forward`` / ``_backward``),
called through ``torch.ops.cprec_cpu`` against the eager reference in float64.

forward -> (loss, head_lse [N], tail_lse [N]): head_lse is the log-sum-exp of each row's
head logits, tail_lse that of its target tail cluster's logits (0 for head targets and
ignored rows). The backward takes both instead of recomputing them.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_all_close

try:
    importlib.import_module("cprec_kernels.cpu")
except ModuleNotFoundError:
    pytest.skip("the C++ extension is not built", allow_module_level=True)

from cprec_kernels import reference  # noqa: E402  (needs the extension)

OPS = torch.ops.cprec_cpu
IGNORE = -100
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _case(dtype, bias, empty_cluster, seed, n=41, d=24, cutoffs=(7, 20, 45, 61)):
    """Parameters, a non-contiguous hidden [n, d] and targets with ignored rows; with
    ``empty_cluster`` no target falls in the second tail [20, 45)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    cutoffs = list(cutoffs)
    dims = [max(1, d // 2 ** (i + 1)) for i in range(len(cutoffs) - 1)]
    head_w = rand(cutoffs[0] + len(dims), d, scale=d**-0.5)
    head_b = rand(cutoffs[0] + len(dims)) if bias else None
    projs = [rand(di, d, scale=d**-0.5) for di in dims]
    tails = [rand(hi - lo, di) for lo, hi, di in zip(cutoffs, cutoffs[1:], dims)]
    hidden = rand(d, n).t()  # non-contiguous
    target = torch.randint(0, cutoffs[-1], (n,), generator=g)
    if empty_cluster:
        target = torch.where((target >= 20) & (target < 45), target % 7, target)
    target[torch.randperm(n, generator=g)[:5]] = IGNORE
    return hidden, target, head_w, head_b, projs, tails, cutoffs


def _expected_stats(hidden, target, head_w, head_b, projs, tails, cutoffs):
    """float64 log-sum-exps of the head logits and of each row's target cluster."""
    h = hidden.double()
    head = torch.logsumexp(F.linear(h, head_w.double(), None if head_b is None else head_b.double()), dim=1)
    tail = torch.zeros_like(head)
    for lo, hi, proj, weight in zip(cutoffs, cutoffs[1:], projs, tails):
        rows = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
        tail[rows] = torch.logsumexp(h[rows] @ proj.double().t() @ weight.double().t(), dim=1)
    return head, tail


def _grad_loss(reduction, n, dtype):
    return torch.randn(n, dtype=dtype) if reduction == "none" else torch.tensor(1.7, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,empty_cluster", [(True, False), (False, True)])
def test_stats_forward_and_backward_match_reference(dtype, reduction, bias, empty_cluster):
    case = _case(dtype, bias, empty_cluster, seed=len(reduction) + 2 * bias + (dtype == torch.float32))
    hidden, target, head_w, head_b, projs, tails, cutoffs = case
    up = [hidden.double(), target, head_w.double(), None if head_b is None else head_b.double(),
          [p.double() for p in projs], [t.double() for t in tails], cutoffs]

    loss, head_lse, tail_lse = OPS.adaptive_softmax_loss_stats_forward(*case, IGNORE, reduction)
    want_head, want_tail = _expected_stats(*case)
    assert loss.dtype == head_lse.dtype == tail_lse.dtype == dtype
    assert head_lse.shape == tail_lse.shape == (hidden.shape[0],)
    assert_all_close([loss.double(), head_lse.double(), tail_lse.double()],
                     [reference.adaptive_softmax_loss_forward(*up, IGNORE, reduction), want_head, want_tail],
                     **TOL[dtype])
    # The loss is the old op's, value for value.
    torch.testing.assert_close(loss, OPS.adaptive_softmax_loss_forward(*case, IGNORE, reduction), rtol=0, atol=0)

    grad_loss = _grad_loss(reduction, hidden.shape[0], dtype)
    got = OPS.adaptive_softmax_loss_stats_backward(grad_loss, *case, IGNORE, reduction, head_lse, tail_lse)
    want = reference.adaptive_softmax_loss_backward(grad_loss.double(), *up, IGNORE, reduction)
    got_flat = [got[0], got[1], got[2] if bias else None, *got[3], *got[4]]
    want_flat = [want[0], want[1], want[2], *want[3], *want[4]]
    assert_all_close([t if t is None else t.double() for t in got_flat], want_flat, **TOL[dtype])
    if empty_cluster:
        assert torch.count_nonzero(got[3][1]) == 0 and torch.count_nonzero(got[4][1]) == 0


def test_stats_backward_uses_the_given_statistics():
    """Shifted statistics rescale the softmax terms: the gradients must move, so the
    backward reads them rather than recomputing them."""
    case = _case(torch.float64, True, False, seed=3)
    hidden = case[0]
    _, head_lse, tail_lse = OPS.adaptive_softmax_loss_stats_forward(*case, IGNORE, "sum")
    grad_loss = torch.tensor(1.0, dtype=torch.float64)
    base = OPS.adaptive_softmax_loss_stats_backward(grad_loss, *case, IGNORE, "sum", head_lse, tail_lse)
    head_shift = OPS.adaptive_softmax_loss_stats_backward(grad_loss, *case, IGNORE, "sum", head_lse + 1, tail_lse)
    tail_shift = OPS.adaptive_softmax_loss_stats_backward(grad_loss, *case, IGNORE, "sum", head_lse, tail_lse + 1)
    assert not torch.allclose(base[1], head_shift[1])  # head weight gradient
    assert torch.equal(base[4][0], head_shift[4][0])  # tails do not read head_lse
    assert not torch.allclose(base[4][0], tail_shift[4][0])  # first tail's weight gradient
    assert torch.equal(base[1], tail_shift[1])
    assert hidden.shape[0] == head_lse.shape[0]


@pytest.mark.parametrize("bad,exc", [("dtype", TypeError), ("shape", ValueError)])
def test_stats_backward_rejects_bad_statistics(bad, exc):
    case = _case(torch.float32, True, False, seed=5)
    _, head_lse, tail_lse = OPS.adaptive_softmax_loss_stats_forward(*case, IGNORE, "mean")
    wrong = head_lse.double() if bad == "dtype" else head_lse[:-1]
    grad_loss = torch.tensor(1.0)
    with pytest.raises(exc, match="head_lse"):
        OPS.adaptive_softmax_loss_stats_backward(grad_loss, *case, IGNORE, "mean", wrong, tail_lse)
