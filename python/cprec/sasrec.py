"""SASRec's middle (Kang and McAuley, ICDM 2018): causal self-attention blocks with
learned positions, on ``scaled_dot_product_attention``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class SelfAttentionBlock(nn.Module):
    """Pre-norm causal self-attention + point-wise feed-forward, both residual.
    x: [B, T, d], mask: [B, 1, T, T] (True = may attend) -> [B, T, d]."""

    def __init__(self, d: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d % num_heads:
            raise ValueError(f"d = {d} must be divisible by num_heads = {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRecEncoder(nn.Module):
    """Item embeddings [B, T, d] -> causal contextual states [B, T, d].

    Embeddings are scaled by sqrt(d) and get a learned position (the last position is
    the most recent item, as inputs are left-padded); padding positions are zeroed
    and never attended to.
    """

    wants_pad_mask = True

    def __init__(self, d: int, max_len: int, num_layers: int = 2, num_heads: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.d, self.max_len = d, max_len
        self.positions = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(d, num_heads, dropout) for _ in range(num_layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds the max_len {self.max_len} of the position table")
        # Positions count back from the newest item so left padding does not shift them.
        pos = torch.arange(self.max_len - T, self.max_len, device=x.device)
        keep = (~pad_mask).unsqueeze(-1).to(x.dtype)
        x = self.drop(x * math.sqrt(self.d) + self.positions(pos)) * keep
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # Attend to earlier real items, and always to oneself (an all-padding row has no other key).
        mask = (causal & ~pad_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.ln(x)
