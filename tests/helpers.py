"""Independent formulations the ops are checked against, and small input makers."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` viewed out of a wider buffer (last dim strided)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view.requires_grad_(t.requires_grad)


def conv_by_padding(x, weight, bias, dilation):
    """causal conv as F.conv1d over a left-padded channels-first copy."""
    K = weight.shape[2]
    y = F.conv1d(F.pad(x.transpose(1, 2), ((K - 1) * dilation, 0)), weight, bias, dilation=dilation)
    return y.transpose(1, 2)


def conv_ln_relu_by_modules(x, weight, bias, ln_weight, ln_bias, dilation, eps, residual=None):
    y = conv_by_padding(x, weight, bias, dilation)
    y = torch.relu(F.layer_norm(y, (weight.shape[0],), ln_weight, ln_bias, eps))
    return y if residual is None else y + residual


def embedding_by_loop(ids, weights, projections, cutoffs, padding_idx=None):
    """One id at a time: find its block by scanning the cutoffs."""
    d = projections[0].shape[0] if projections[0] is not None else weights[0].shape[1]
    flat = ids.reshape(-1).tolist()
    rows = []
    for i in flat:
        if i == padding_idx:
            rows.append(torch.zeros(d, dtype=weights[0].dtype))
            continue
        j = next(j for j, c in enumerate(cutoffs) if i < c)
        lo = 0 if j == 0 else cutoffs[j - 1]
        v = weights[j][i - lo]
        rows.append(v if projections[j] is None else F.linear(v, projections[j]))
    return torch.stack(rows).reshape(*ids.shape, d)


def make_adaptive(d, cutoffs, div_value=2.0, head_bias=False, dtype=torch.float64):
    """An nn.AdaptiveLogSoftmaxWithLoss and its parameters in the functional layout."""
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(d, cutoffs[-1], cutoffs[:-1], div_value, head_bias).to(dtype)
    params = (
        module.head.weight,
        module.head.bias,
        [t[0].weight for t in module.tail],
        [t[1].weight for t in module.tail],
    )
    return module, params


def grads(out, inputs):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, allow_unused=True)


def assert_all_close(a_list, b_list, **tol):
    for a, b in zip(a_list, b_list):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, **tol)


def source_tree_env(**extra: str) -> dict:
    """The environment for a ``python -m cprec`` subprocess that runs from the source tree
    whether or not the package is installed, on one OpenMP thread."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python"), env.get("PYTHONPATH", "")])
    return env
