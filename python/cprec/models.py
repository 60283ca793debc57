"""The recommenders: popularity baseline, NextItNet and CpRec.

Every model reads item ids ``[B, T]`` (left-padded with ``pad = V``), trains on the
next item at every position, and ranks all V items from the last position.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cprec_kernels.nn import AdaptiveSoftmax, BlockwiseEmbedding, CausalConv1d, NextItNetBlock
from cprec_kernels.reference import mask_excluded

from .sharing import layer_map

Tensor = torch.Tensor
MODELS = ("cprec", "nextitnet", "pop")


def _count(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class Recommender(nn.Module):
    """Common interface: ``loss``, ``scores``, ``recommend``, ``num_parameters``."""

    trainable = True

    def __init__(self, num_items: int) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items

    @property
    def pad(self) -> int:
        return self.num_items

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Mean next-item NLL over the positions whose target is not padding.
        inputs, targets: [B, T] -> scalar."""
        raise NotImplementedError

    def scores(self, inputs: Tensor) -> Tensor:
        """log p(item) after the last position.  inputs: [B, T] -> [B, V]."""
        raise NotImplementedError

    def recommend(self, inputs: Tensor, k: int, exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Top-k items after the last position: (log-probs [B, k], ids [B, k]).
        exclude: [B, m] ids never recommended (negative or V entries are padding)."""
        scores = self.scores(inputs)
        if exclude is not None:
            scores = mask_excluded(scores, torch.where(exclude >= self.num_items, -1, exclude))
        return torch.topk(scores, k, dim=1)

    def num_parameters(self) -> Dict[str, int]:
        """Parameter counts by part (shared parameters counted once)."""
        parts = {
            part: _count(getattr(self, name, None))
            for part, name in (("input", "input_layer"), ("middle", "middle"), ("output", "output_layer"))
        }
        parts["total"] = sum(parts.values())
        return parts


class PopularityModel(Recommender):
    """Ranks items by training frequency, whatever the history: the floor to beat."""

    trainable = False

    def __init__(self, num_items: int, counts: Optional[Sequence[int]] = None) -> None:
        super().__init__(num_items)
        counts_t = torch.zeros(num_items) if counts is None else torch.as_tensor(counts, dtype=torch.float32)
        self.register_buffer("log_counts", torch.log1p(counts_t))

    def scores(self, inputs: Tensor) -> Tensor:
        return torch.log_softmax(self.log_counts, dim=0).expand(inputs.shape[0], -1)


class ResidualStack(nn.Module):
    """The middle of NextItNet: residual blocks of dilated causal convs whose conv
    parameters are shared according to ``sharing``.  x: [B, T, d] -> [B, T, d]."""

    def __init__(
        self,
        d: int,
        block_dilations: Sequence[int],
        sharing: str = "none",
        kernel_size: int = 3,
        eps: float = 1e-8,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.sharing = sharing
        mapping = layer_map(sharing, len(block_dilations))
        self.convs = nn.ModuleList(
            CausalConv1d(d, d, kernel_size, backend=backend) for _ in range(max(mapping) + 1)
        )
        self.blocks = nn.ModuleList(
            NextItNetBlock(
                d, dil, conv1=self.convs[mapping[2 * b]], conv2=self.convs[mapping[2 * b + 1]],
                kernel_size=kernel_size, eps=eps, backend=backend,
            )
            for b, dil in enumerate(block_dilations)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class NextItNet(Recommender):
    """NextItNet (Yuan et al., WSDM 2019): full embedding, residual dilated causal
    convs, full softmax over the V items."""

    def __init__(
        self,
        num_items: int,
        d: int = 64,
        block_dilations: Sequence[int] = (1, 4, 1, 4),
        kernel_size: int = 3,
        sharing: str = "none",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(num_items)
        self.input_layer = nn.Embedding(num_items + 1, d, padding_idx=num_items)
        self.middle = ResidualStack(d, block_dilations, sharing, kernel_size, backend=backend)
        self.output_layer = nn.Linear(d, num_items)

    def hidden(self, inputs: Tensor) -> Tensor:
        """inputs: [B, T] -> [B, T, d]."""
        return self.middle(self.input_layer(inputs))

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = self.output_layer(self.hidden(inputs)).flatten(0, 1)
        return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=self.pad)

    def scores(self, inputs: Tensor) -> Tensor:
        return torch.log_softmax(self.output_layer(self.hidden(inputs)[:, -1]).float(), dim=-1)


class CpRec(Recommender):
    """CpRec (Sun et al., SIGIR 2020): NextItNet with a block-wise factorized input
    embedding, an adaptive softmax output sharing the same frequency cutoffs, and
    layer-wise sharing of the residual convs."""

    def __init__(
        self,
        num_items: int,
        cutoffs: Sequence[int],
        d: int = 64,
        block_dilations: Sequence[int] = (1, 4, 1, 4),
        kernel_size: int = 3,
        sharing: str = "cross-block",
        div_value: float = 4.0,
        head_projection: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(num_items)
        cutoffs = list(cutoffs)
        if not cutoffs or cutoffs[-1] != num_items:
            raise ValueError(f"cutoffs must end at num_items = {num_items}, got {cutoffs}")
        self.input_layer = BlockwiseEmbedding(
            cutoffs, d, div_value, head_projection=head_projection, padding_idx=num_items, backend=backend
        )
        self.middle = ResidualStack(d, block_dilations, sharing, kernel_size, backend=backend)
        self.output_layer = AdaptiveSoftmax(d, cutoffs, div_value, backend=backend)

    def hidden(self, inputs: Tensor) -> Tensor:
        return self.middle(self.input_layer(inputs))

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        h = self.hidden(inputs)
        return self.output_layer(h.flatten(0, 1), targets.reshape(-1), ignore_index=self.pad)

    def scores(self, inputs: Tensor) -> Tensor:
        return self.output_layer.log_prob(self.hidden(inputs)[:, -1])

    def recommend(self, inputs: Tensor, k: int, exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if exclude is not None:
            exclude = torch.where(exclude >= self.num_items, -1, exclude)
        return self.output_layer.topk(self.hidden(inputs)[:, -1], k, exclude)


def build_model(config: dict, counts: Optional[Sequence[int]] = None) -> Recommender:
    """A model from a plain config dict (as stored in checkpoints).

    Keys: model, num_items, d, block_dilations, kernel_size, sharing, cutoffs,
    div_value, head_projection, backend.
    """
    kind, V = config["model"], int(config["num_items"])
    if kind == "pop":
        return PopularityModel(V, counts)
    common = dict(
        d=int(config["d"]),
        block_dilations=[int(x) for x in config["block_dilations"]],
        kernel_size=int(config["kernel_size"]),
        sharing=config["sharing"],
        backend=config.get("backend"),
    )
    if kind == "nextitnet":
        return NextItNet(V, **common)
    if kind == "cprec":
        return CpRec(
            V, cutoffs=config["cutoffs"], div_value=float(config["div_value"]),
            head_projection=bool(config.get("head_projection", False)), **common,
        )
    raise ValueError(f"model must be one of {MODELS}, got {kind!r}")


def parameter_table(config: dict) -> Dict[str, Dict[str, int]]:
    """Parameter counts by part of a CpRec config and of the NextItNet with the same
    d, dilations and vocabulary (sharing none): the compression ratio's terms."""
    cprec = build_model({**config, "model": "cprec"}).num_parameters()
    base = build_model({**config, "model": "nextitnet", "sharing": "none"}).num_parameters()
    return {"nextitnet": base, "cprec": cprec}


def block_dilations_list(text: str) -> List[int]:
    """Parse "1,4,1,4" into block dilations (each block's convs use d and 2d)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"dilations must be comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"dilations must be ints >= 1, got {text!r}")
    return values
