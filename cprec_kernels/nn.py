"""``nn.Module`` drop-ins built on the functional ops.

Modules take activations channels-last (``[B, T, C]``), as sequence models hold them,
and a ``backend`` that is passed to every op call (None: ``$CPREC_BACKEND`` or auto).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import adaptive_softmax as _asm
from ._core.validation import check_cutoffs
from .conv import causal_conv1d, causal_conv1d_ln_relu
from .embedding import blockwise_embedding

Tensor = torch.Tensor

__all__ = [
    "CausalConv1d", "NextItNetBlock", "BlockwiseEmbedding", "AdaptiveSoftmax", "block_width", "every_nth_from_end",
    "input_stride", "last_position",
]


def block_width(d: int, div_value: float, j: int) -> int:
    """Width of block j: d // div_value**j (at least 1)."""
    return max(1, int(d // (div_value**j)))


class CausalConv1d(nn.Module):
    """Causal dilated convolution.  x: [B, T, in_channels] -> [B, T, out_channels].

    ``weight`` has the ``nn.Conv1d`` layout [out, in, kernel_size] and the same init.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        bias: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.dilation, self.backend = dilation, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1] * self.weight.shape[2])
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return causal_conv1d(x, self.weight, self.bias, self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        o, i, k = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, dilation={self.dilation}, bias={self.bias is not None}"


def every_nth_from_end(x: Tensor, step: int) -> Tensor:
    """Positions T-1, T-1-step, T-1-2*step, ... of x, in time order.  x: [B, T, ...]."""
    return x[:, (x.shape[1] - 1) % step :: step]


class NextItNetBlock(nn.Module):
    """NextItNet residual block: x + relu(ln2(conv2(relu(ln1(conv1(x)))))).

    conv1 has dilation ``dilation`` and conv2 ``2 * dilation``. ``conv1``/``conv2``
    may be given from outside to share them between blocks (the owner registers
    them; this block only refers to them); otherwise the block makes its own.
    The LayerNorms always belong to the block.  x: [B, T, channels] -> same.
    """

    def __init__(
        self,
        channels: int,
        dilation: int = 1,
        conv1: Optional[CausalConv1d] = None,
        conv2: Optional[CausalConv1d] = None,
        kernel_size: int = 3,
        eps: float = 1e-8,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if (conv1 is None) != (conv2 is None):
            raise ValueError("give both conv1 and conv2 (shared) or neither (own)")
        if conv1 is None:
            self.own_convs = nn.ModuleList(CausalConv1d(channels, channels, kernel_size) for _ in range(2))
            conv1, conv2 = self.own_convs
        for name, conv in (("conv1", conv1), ("conv2", conv2)):
            if tuple(conv.weight.shape[:2]) != (channels, channels):
                raise ValueError(f"{name} must map {channels} to {channels} channels, got {tuple(conv.weight.shape)}")
        # A tuple keeps shared convs out of this module's state_dict: the owner holds them.
        self._convs: Tuple[CausalConv1d, CausalConv1d] = (conv1, conv2)
        self.ln1 = nn.LayerNorm(channels, eps=eps)
        self.ln2 = nn.LayerNorm(channels, eps=eps)
        self.dilation, self.eps, self.backend = dilation, eps, backend

    @property
    def conv1(self) -> CausalConv1d:
        return self._convs[0]

    @property
    def conv2(self) -> CausalConv1d:
        return self._convs[1]

    def forward(self, x: Tensor) -> Tensor:
        c1, c2 = self._convs
        h = causal_conv1d_ln_relu(
            x, c1.weight, c1.bias, self.ln1.weight, self.ln1.bias, self.dilation, self.eps, backend=self.backend
        )
        return causal_conv1d_ln_relu(
            h, c2.weight, c2.bias, self.ln2.weight, self.ln2.bias, 2 * self.dilation, self.eps,
            residual=x, backend=self.backend,
        )

    def forward_strided(self, x: Tensor, in_stride: int, out_stride: Optional[int]) -> Tensor:
        """The block evaluated on a grid of positions only.

        x: [B, n, C], the block input at positions T-1, T-1-s, ... (s = ``in_stride``,
        which must divide the dilation and ``out_stride``) in time order. Returns the
        output at stride ``out_stride`` the same way, or at the last position only
        ([B, 1, C]) when it is None. Exact: when s divides the dilation, a causal conv
        at grid positions reads only grid positions, and the grid has no position
        before its first one but the sequence's left padding.
        """
        d1, d2 = self.dilation, 2 * self.dilation
        if d1 % in_stride or (out_stride is not None and out_stride % in_stride):
            raise ValueError(f"in_stride {in_stride} must divide the dilation {d1} and out_stride {out_stride}")
        grid2 = d2 if out_stride is None else math.gcd(out_stride, d2)  # where conv2 has to be evaluated
        c1, c2 = self._convs
        h = causal_conv1d_ln_relu(
            x, c1.weight, c1.bias, self.ln1.weight, self.ln1.bias, d1 // in_stride, self.eps, backend=self.backend
        )
        step = grid2 // in_stride
        y = causal_conv1d_ln_relu(
            every_nth_from_end(h, step), c2.weight, c2.bias, self.ln2.weight, self.ln2.bias, d2 // grid2, self.eps,
            residual=every_nth_from_end(x, step), backend=self.backend,
        )
        return y[:, -1:] if out_stride is None else every_nth_from_end(y, out_stride // grid2)

    def extra_repr(self) -> str:
        return f"dilation=({self.dilation}, {2 * self.dilation}), eps={self.eps}"


def last_position(blocks: Sequence[NextItNetBlock], x: Tensor, strided: bool = False) -> Tensor:
    """The last position of ``blocks`` applied in turn, computing only the positions it
    depends on (what serving needs).

    x: [B, T, C] (or, with ``strided``, already ``every_nth_from_end(x, s)`` for
    ``s = input_stride(blocks)``) -> [B, C]. For dilations 1, 2, 4, 8 and T = 50 the
    convs evaluate 144 positions instead of 400.
    """
    strides = _input_strides(blocks)
    if not strided:
        x = every_nth_from_end(x, strides[0])
    outs = strides[1:] + [None]
    for block, s_in, s_out in zip(blocks, strides, outs):
        x = block.forward_strided(x, s_in, s_out)
    return x[:, -1]


def input_stride(blocks: Sequence[NextItNetBlock]) -> int:
    """Stride of the input positions that ``last_position`` reads."""
    return _input_strides(blocks)[0]


def _input_strides(blocks: Sequence[NextItNetBlock]) -> list:
    # Top down: a block whose output is needed at stride S needs its input at stride
    # gcd(S, dilation) (the last position alone: S = None, the dilation itself).
    strides, out = [], None
    for block in reversed(list(blocks)):
        out = block.dilation if out is None else math.gcd(out, block.dilation)
        strides.append(out)
    return strides[::-1]


class BlockwiseEmbedding(nn.Module):
    """CpRec's block-wise factorized input embedding.

    Items are ids in [0, V) ordered by descending frequency; ``cutoffs = [c1, ..., V]``
    cut them into blocks. Block j has a table [c_{j+1} - c_j, d // div_value**j] and a
    projection [d, d_j] to width d (the head's only with ``head_projection``).
    ids: [*] -> [*, embedding_dim]. ``padding_idx`` (may be V, outside the items)
    gives zero rows and no gradient.
    """

    def __init__(
        self,
        cutoffs: Sequence[int],
        embedding_dim: int,
        div_value: float = 4.0,
        head_projection: bool = False,
        padding_idx: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.cutoffs = check_cutoffs(cutoffs)
        self.embedding_dim, self.div_value = embedding_dim, div_value
        self.padding_idx, self.backend = padding_idx, backend
        edges = [0] + self.cutoffs
        widths = [block_width(embedding_dim, div_value, j) for j in range(len(self.cutoffs))]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(hi - lo, w)) for lo, hi, w in zip(edges[:-1], edges[1:], widths)
        )
        self.head_projection = nn.Parameter(torch.empty(embedding_dim, widths[0])) if head_projection else None
        self.tail_projections = nn.ParameterList(nn.Parameter(torch.empty(embedding_dim, w)) for w in widths[1:])
        self.reset_parameters()

    @property
    def num_embeddings(self) -> int:
        return self.cutoffs[-1]

    def projections(self) -> list:
        return [self.head_projection, *self.tail_projections]

    def reset_parameters(self) -> None:
        # As fairseq's AdaptiveInput: N(0, d_j^-1/2) tables, Xavier projections.
        for table in self.weights:
            nn.init.normal_(table, std=table.shape[1] ** -0.5)
        for proj in self.projections():
            if proj is not None:
                nn.init.xavier_uniform_(proj)
        if self.padding_idx is not None and 0 <= self.padding_idx < self.cutoffs[0]:
            with torch.no_grad():
                self.weights[0][self.padding_idx].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        return blockwise_embedding(
            ids, list(self.weights), self.projections(), self.cutoffs, self.padding_idx, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"cutoffs={self.cutoffs}, embedding_dim={self.embedding_dim}, div_value={self.div_value}"


class AdaptiveSoftmax(nn.Module):
    """Tail-cluster adaptive softmax with the parameters of ``nn.AdaptiveLogSoftmaxWithLoss``.

    ``cutoffs = [c1, ..., V]`` (ending at V, unlike PyTorch's module, which takes V
    apart as ``n_classes``). Tail i has width in_features // div_value**(i+1).
    ``forward(hidden [N, d], target [N])`` gives the loss; ``log_prob`` [N, V] and
    ``topk`` rank items.
    """

    def __init__(
        self,
        in_features: int,
        cutoffs: Sequence[int],
        div_value: float = 4.0,
        head_bias: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.cutoffs = check_cutoffs(cutoffs)
        self.in_features, self.div_value, self.backend = in_features, div_value, backend
        n_tails = len(self.cutoffs) - 1
        self.head_weight = nn.Parameter(torch.empty(self.cutoffs[0] + n_tails, in_features))
        self.head_bias = nn.Parameter(torch.empty(self.cutoffs[0] + n_tails)) if head_bias else None
        widths = [block_width(in_features, div_value, i + 1) for i in range(n_tails)]
        sizes = [hi - lo for lo, hi in zip(self.cutoffs[:-1], self.cutoffs[1:])]
        self.tail_projections = nn.ParameterList(nn.Parameter(torch.empty(w, in_features)) for w in widths)
        self.tail_weights = nn.ParameterList(nn.Parameter(torch.empty(s, w)) for s, w in zip(sizes, widths))
        self.reset_parameters()

    @property
    def n_classes(self) -> int:
        return self.cutoffs[-1]

    def reset_parameters(self) -> None:
        # nn.Linear's init, as the PyTorch module has.
        for w in (self.head_weight, *self.tail_projections, *self.tail_weights):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.head_bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.head_bias, -bound, bound)

    def _params(self) -> tuple:
        return self.head_weight, self.head_bias, list(self.tail_projections), list(self.tail_weights), self.cutoffs

    def forward(self, hidden: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
        return _asm.adaptive_softmax_loss(
            hidden, target, *self._params(), ignore_index=ignore_index, reduction=reduction, backend=self.backend
        )

    def log_prob(self, hidden: Tensor) -> Tensor:
        """log p(item | hidden) for every item: hidden [N, d] -> [N, V] (float32, or
        float64 for float64 inputs). Materialises [N, V]: to rank items use ``topk``."""
        return _asm.adaptive_log_prob(hidden, *self._params(), backend=self.backend)

    def topk(self, hidden: Tensor, k: int, exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The k most likely items per row, best first, without the [N, V] matrix.

        hidden: [N, d]; exclude: [N, m] ids never returned for their row (negative
        entries and the padding id V are skipped) -> (log_probs [N, k], ids [N, k]
        int64). A row with fewer than k items left after ``exclude`` gets id -1 and
        log-prob -inf in its last slots. Differentiable in the log-probs.
        """
        return _asm.adaptive_topk(hidden, *self._params(), k, exclude=exclude, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.AdaptiveLogSoftmaxWithLoss, backend: Optional[str] = None) -> "AdaptiveSoftmax":
        """A copy of ``module``'s parameters (same cutoffs, div_value, head_bias)."""
        new = cls(
            module.in_features, list(module.cutoffs), module.div_value, module.head_bias, backend=backend
        ).to(device=module.head.weight.device, dtype=module.head.weight.dtype)
        new.load_state_dict(_torch_to_ours(module.state_dict(), len(module.tail)))
        return new

    def to_torch(self) -> nn.AdaptiveLogSoftmaxWithLoss:
        """An ``nn.AdaptiveLogSoftmaxWithLoss`` holding a copy of these parameters."""
        module = nn.AdaptiveLogSoftmaxWithLoss(
            self.in_features, self.cutoffs[-1], self.cutoffs[:-1], self.div_value, self.head_bias is not None
        ).to(device=self.head_weight.device, dtype=self.head_weight.dtype)
        ours = self.state_dict()
        theirs = {"head.weight": ours["head_weight"]}
        if self.head_bias is not None:
            theirs["head.bias"] = ours["head_bias"]
        for i in range(len(self.tail_weights)):
            theirs[f"tail.{i}.0.weight"] = ours[f"tail_projections.{i}"]
            theirs[f"tail.{i}.1.weight"] = ours[f"tail_weights.{i}"]
        module.load_state_dict(theirs)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, cutoffs={self.cutoffs}, div_value={self.div_value}"


def _torch_to_ours(state: dict, n_tails: int) -> dict:
    ours = {"head_weight": state["head.weight"]}
    if "head.bias" in state:
        ours["head_bias"] = state["head.bias"]
    for i in range(n_tails):
        ours[f"tail_projections.{i}"] = state[f"tail.{i}.0.weight"]
        ours[f"tail_weights.{i}"] = state[f"tail.{i}.1.weight"]
    return ours
