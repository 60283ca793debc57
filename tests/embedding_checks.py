"""Block-wise embedding checks shared by the Triton and CUDA backend tests: parameter
makers, a runner that returns values and every gradient, and a dense float64 oracle."""
import torch
import torch.nn.functional as F

import cprec_kernels as ck


def make_params(cutoffs, widths, d, dtype, head_projection, device=None):
    """Tables N(0, 1/d_j) and projections N(0, 1), so outputs are O(1). -> (weights, projections)."""
    edges = [0] + list(cutoffs)
    weights = [
        (torch.randn(hi - lo, w, dtype=torch.float64) * w**-0.5).to(device=device, dtype=dtype).requires_grad_()
        for lo, hi, w in zip(edges[:-1], edges[1:], widths)
    ]
    projections = [
        torch.randn(d, w, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() if j > 0 or head_projection else None
        for j, w in enumerate(widths)
    ]
    return weights, projections


def run(ids, weights, projections, cutoffs, padding_idx, grad, backend, **kwargs):
    """-> (out, [grad of each table], [grad of each projection or None])."""
    out = ck.blockwise_embedding(ids, weights, projections, cutoffs, padding_idx, backend=backend, **kwargs)
    leaves = list(weights) + [p for p in projections if p is not None]
    grads = iter(torch.autograd.grad(out, leaves, grad))
    grad_w = [next(grads) for _ in weights]
    grad_p = [None if p is None else next(grads) for p in projections]
    return out, grad_w, grad_p


def dense_oracle(ids, weights, projections, cutoffs, padding_idx, grad):
    """The same op as one float64 lookup in the dense [V, d] matrix, grads by autograd."""
    w64 = [w.detach().double().requires_grad_() for w in weights]
    p64 = [None if p is None else p.detach().double().requires_grad_() for p in projections]
    full = torch.cat([w if p is None else w @ p.t() for w, p in zip(w64, p64)])
    flat = ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < cutoffs[-1])
    if padding_idx is not None:
        keep &= flat != padding_idx
    out = (F.embedding(torch.where(keep, flat, 0), full) * keep[:, None]).reshape(*ids.shape, -1)
    out.backward(grad.double())
    return out, [w.grad for w in w64], [None if p is None else p.grad for p in p64]
