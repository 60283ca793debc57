"""GRU4Rec's middle (Hidasi et al., ICLR 2016): a GRU over the session."""
from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class GRUEncoder(nn.Module):
    """Item embeddings [B, T, d] -> GRU states [B, T, d] (causal by construction).
    Left padding enters as zero vectors before the first real item."""

    def __init__(self, d: int, num_layers: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(self.drop(x))
        return self.drop(out)
