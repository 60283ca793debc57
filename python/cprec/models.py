"""The recommenders: popularity baseline, NextItNet and CpRec.

Every model reads item ids ``[B, T]`` (left-padded with ``pad = V``), trains on the
next item at every position, and ranks all V items from the last position.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cprec_kernels.nn import (
    AdaptiveSoftmax,
    BlockwiseEmbedding,
    CausalConv1d,
    NextItNetBlock,
    every_nth_from_end,
    input_stride,
    last_position,
)
from cprec_kernels import mask_excluded

from .sharing import layer_map
from .tied import TiedAdaptiveSoftmax

Tensor = torch.Tensor
MODELS = ("cprec", "nextitnet", "sasrec", "gru4rec", "pop")


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
        """Mean next-item NLL over the targets that are not padding.
        inputs: [B, T]; targets: [B, T] (every position) or [B] (the last position
        only) -> scalar."""
        raise NotImplementedError

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss (what DistributedDataParallel wraps)."""
        return self.loss(inputs, targets)

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
    parameters are shared according to ``sharing``.  x: [B, T, d] -> [B, T, d].

    ``dropout`` (training only) drops entries of the stack's input (the item
    embeddings) and of each block's residual branch: x + dropout(F(x)).
    """

    def __init__(
        self,
        d: int,
        block_dilations: Sequence[int],
        sharing: str = "none",
        kernel_size: int = 3,
        eps: float = 1e-8,
        backend: Optional[str] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.sharing = sharing
        self.drop = nn.Dropout(dropout)
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
        if not (self.training and self.drop.p > 0):
            for block in self.blocks:
                x = block(x)
            return x
        x = self.drop(x)
        for block in self.blocks:
            # The fused block adds the residual inside its kernel (cprec_kernels, not
            # ours to change), so the branch is recovered as block(x) - x.
            x = x + self.drop(block(x) - x)
        return x


class TiedOutput(nn.Module):
    """Full softmax whose item vectors are the input embedding's rows (tied
    embeddings): logits = h E[:V]^T + b; only the bias is its own parameter.
    h: [N, d] -> [N, V]."""

    def __init__(self, embedding: nn.Embedding, num_items: int) -> None:
        super().__init__()
        # Held in a tuple so the embedding is not a submodule here: its parameters
        # belong to (and are counted once in) the input layer.
        self._embedding = (embedding,)
        self.bias = nn.Parameter(torch.zeros(num_items))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self._embedding[0].weight[: self.bias.shape[0]], self.bias)


INPUTS = ("full", "blockwise")
OUTPUTS = ("full", "adaptive")


class SequenceRecommender(Recommender):
    """input layer -> middle -> output layer, with either end full or factorized.

    ``input``: "full" (``nn.Embedding`` of V + 1 rows, the last for padding) or
    "blockwise" (CpRec's ``BlockwiseEmbedding``); ``output``: "full" (``nn.Linear``
    to V logits + cross-entropy) or "adaptive" (``AdaptiveSoftmax``). Factorized
    ends share ``cutoffs`` and ``div_value``. ``middle`` maps [B, T, d] to [B, T, d]
    causally and takes a ``pad_mask`` [B, T] (True at padding) if it wants one.
    """

    def __init__(
        self,
        num_items: int,
        d: int,
        middle: nn.Module,
        input: str = "full",
        output: str = "full",
        cutoffs: Optional[Sequence[int]] = None,
        div_value: float = 4.0,
        head_projection: bool = False,
        backend: Optional[str] = None,
        tie_embeddings: bool = False,
        tie_projections: bool = False,
    ) -> None:
        super().__init__(num_items)
        if tie_embeddings and (input, output) not in (("full", "full"), ("blockwise", "adaptive")):
            raise ValueError(
                f"tied embeddings need full input and output layers or blockwise input and adaptive output, "
                f"got {input!r} and {output!r}"
            )
        if tie_projections and not (tie_embeddings and output == "adaptive"):
            raise ValueError("tie_projections needs tie_embeddings with blockwise input and adaptive output")
        if input not in INPUTS or output not in OUTPUTS:
            raise ValueError(f"input must be one of {INPUTS} and output one of {OUTPUTS}, got {input!r}, {output!r}")
        if "blockwise" == input or "adaptive" == output:
            cutoffs = list(cutoffs or [])
            if not cutoffs or cutoffs[-1] != num_items:
                raise ValueError(f"cutoffs must end at num_items = {num_items}, got {cutoffs}")
        self.input_kind, self.output_kind = input, output
        if input == "full":
            self.input_layer = nn.Embedding(num_items + 1, d, padding_idx=num_items)
        else:
            self.input_layer = BlockwiseEmbedding(
                cutoffs, d, div_value, head_projection=head_projection, padding_idx=num_items, backend=backend
            )
        self.middle = middle
        if tie_embeddings and output == "adaptive":
            # The block-wise tables already start at N(0, d_j^-1/2), the tied scale.
            self.output_layer = TiedAdaptiveSoftmax(self.input_layer, tie_projections, backend=backend)
        elif tie_embeddings:
            # N(0, 1) rows would put logits at std ~ sqrt(d) and saturate the softmax
            # from the first step; the usual tied-embedding scale keeps them near 1.
            with torch.no_grad():
                self.input_layer.weight.normal_(0.0, d**-0.5)
                self.input_layer.weight[num_items].zero_()
            self.output_layer = TiedOutput(self.input_layer, num_items)
        elif output == "full":
            self.output_layer = nn.Linear(d, num_items)
        else:
            self.output_layer = AdaptiveSoftmax(d, cutoffs, div_value, backend=backend)

    def hidden(self, inputs: Tensor) -> Tensor:
        """inputs: [B, T] -> [B, T, d]."""
        x = self.input_layer(inputs)
        if getattr(self.middle, "wants_pad_mask", False):
            return self.middle(x, inputs == self.pad)
        return self.middle(x)

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        h = self.hidden(inputs)
        if targets.dim() == 1:
            h = h[:, -1]  # the last-position objective: one target per history
        else:
            h, targets = h.flatten(0, 1), targets.reshape(-1)
        if self.output_kind == "adaptive":
            return self.output_layer(h, targets, ignore_index=self.pad)
        return F.cross_entropy(self.output_layer(h).float(), targets, ignore_index=self.pad)

    def last_hidden(self, inputs: Tensor) -> Tensor:
        """The hidden state after the last position.  inputs: [B, T] -> [B, d].

        A convolutional middle evaluates only the positions the last one depends on
        (``cprec_kernels.nn.last_position``); the input layer embeds only those.
        """
        if isinstance(self.middle, ResidualStack):
            blocks = self.middle.blocks
            x = self.input_layer(every_nth_from_end(inputs, input_stride(blocks)))
            return last_position(blocks, x, strided=True)
        return self.hidden(inputs)[:, -1]

    def scores(self, inputs: Tensor) -> Tensor:
        last = self.last_hidden(inputs)
        if self.output_kind == "adaptive":
            return self.output_layer.log_prob(last)
        return torch.log_softmax(self.output_layer(last).float(), dim=-1)

    def recommend(self, inputs: Tensor, k: int, exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.output_kind != "adaptive":
            return super().recommend(inputs, k, exclude)
        if exclude is not None:
            exclude = torch.where(exclude >= self.num_items, -1, exclude)
        # Streaming top-k: the [B, V] scores are never built by the fused backends.
        return self.output_layer.topk(self.last_hidden(inputs), k, exclude)


class NextItNet(SequenceRecommender):
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
        dropout: float = 0.0,
        **ends,
    ) -> None:
        middle = ResidualStack(d, block_dilations, sharing, kernel_size, backend=backend, dropout=dropout)
        super().__init__(num_items, d, middle, backend=backend, **ends)


class CpRec(NextItNet):
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
        input: str = "blockwise",
        output: str = "adaptive",
        tie_embeddings: bool = False,
        tie_projections: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            num_items, d, block_dilations, kernel_size, sharing, backend, dropout,
            input=input, output=output, cutoffs=cutoffs, div_value=div_value, head_projection=head_projection,
            tie_embeddings=tie_embeddings, tie_projections=tie_projections,
        )


# The ends each model has when the config does not say: CpRec is the compressed NextItNet.
DEFAULT_ENDS = {"nextitnet": ("full", "full"), "cprec": ("blockwise", "adaptive"),
                "sasrec": ("full", "full"), "gru4rec": ("full", "full")}


def model_ends(config: dict) -> Tuple[str, str]:
    """(input, output) kinds of a config, the model's defaults where unset."""
    default_in, default_out = DEFAULT_ENDS[config["model"]]
    return config.get("input") or default_in, config.get("output") or default_out


CNN_MODELS = ("nextitnet", "cprec")  # the dilated causal conv stacks; the others are SASRec/GRU4Rec


def model_dropout(config: dict) -> float:
    """A model config's dropout rate. Configs from before the CNN models had dropout carry
    no rate, and those models trained without it; SASRec/GRU4Rec always defaulted to 0.2."""
    return float(config.get("dropout", 0.0 if config["model"] in CNN_MODELS else 0.2))


def _middle(config: dict) -> nn.Module:
    kind, d, dropout = config["model"], int(config["d"]), model_dropout(config)
    if kind in CNN_MODELS:
        return ResidualStack(
            d, [int(x) for x in config["block_dilations"]], config["sharing"], int(config["kernel_size"]),
            backend=config.get("backend"), dropout=dropout,
        )
    from .gru4rec import GRUEncoder
    from .sasrec import SASRecEncoder

    layers = int(config.get("num_layers", 2))
    if kind == "sasrec":
        return SASRecEncoder(d, int(config["max_len"]), layers, int(config.get("num_heads", 1)), dropout)
    return GRUEncoder(d, layers, dropout)


def build_model(config: dict, counts: Optional[Sequence[int]] = None) -> Recommender:
    """A model from a plain config dict (as stored in checkpoints).

    Keys: model (one of MODELS), num_items, d; for nextitnet/cprec block_dilations,
    kernel_size, sharing; for sasrec/gru4rec max_len, num_layers, num_heads, dropout;
    input ("full"/"blockwise") and output ("full"/"adaptive") with cutoffs,
    div_value, head_projection for factorized ends; tie_embeddings (full ends, or
    blockwise input with adaptive output) and tie_projections (the latter only);
    dropout (every model; for nextitnet/cprec on the embedding and each residual
    branch); backend.
    """
    kind = config["model"]
    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    V = int(config["num_items"])
    if kind == "pop":
        return PopularityModel(V, counts)
    input_kind, output_kind = model_ends(config)
    return SequenceRecommender(
        V, int(config["d"]), _middle(config), input_kind, output_kind, config.get("cutoffs"),
        float(config.get("div_value", 4.0)), bool(config.get("head_projection", False)), config.get("backend"),
        bool(config.get("tie_embeddings", False)), bool(config.get("tie_projections", False)),
    )


def parameter_table(config: dict) -> Dict[str, Dict[str, int]]:
    """Parameter counts by part of a compressed config and of its uncompressed
    baseline (same model, d and vocabulary, full ends; NextItNet without sharing for
    CpRec): the compression ratio's terms. The compressed side defaults to
    blockwise input and adaptive output."""
    kind = config["model"]
    if kind == "pop":
        raise ValueError("the popularity model has no parameters to compare")
    ends = {"input": config.get("input") or "blockwise", "output": config.get("output") or "adaptive"}
    compressed = build_model({**config, **ends}).num_parameters()
    base_kind = "nextitnet" if kind == "cprec" else kind
    base_cfg = {**config, "model": base_kind, "input": "full", "output": "full", "tie_embeddings": False,
                "tie_projections": False}
    if base_kind == "nextitnet":
        base_cfg["sharing"] = "none"
    return {"baseline": build_model(base_cfg).num_parameters(), "compressed": compressed}


def block_dilations_list(text: str) -> List[int]:
    """Parse "1,4,1,4" into block dilations (each block's convs use d and 2d)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"dilations must be comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"dilations must be ints >= 1, got {text!r}")
    return values
