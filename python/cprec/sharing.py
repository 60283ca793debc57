"""Layer-wise parameter sharing of the residual layers (CpRec section on sharing).

With B residual blocks there are 2B conv layers, layer 2b + c being conv c of block
b. A scheme maps each layer to the index of the conv parameter set it uses; a new
scheme is one function. LayerNorms are never shared.
"""
from __future__ import annotations

from typing import Callable, Dict, List


def none(num_blocks: int) -> List[int]:
    """NextItNet: every layer has its own conv."""
    return list(range(2 * num_blocks))


def cross_layer(num_blocks: int) -> List[int]:
    """ALBERT style: all layers share one conv."""
    return [0] * (2 * num_blocks)


def cross_block(num_blocks: int) -> List[int]:
    """Every block reuses one block's two convs."""
    return [layer % 2 for layer in range(2 * num_blocks)]


def adjacent_layer(num_blocks: int) -> List[int]:
    """The two convs inside each block are one."""
    return [layer // 2 for layer in range(2 * num_blocks)]


def adjacent_block(num_blocks: int) -> List[int]:
    """Blocks (0, 1), (2, 3), ... share both convs."""
    return [(layer // 4) * 2 + layer % 2 for layer in range(2 * num_blocks)]


SCHEMES: Dict[str, Callable[[int], List[int]]] = {
    "none": none,
    "cross-layer": cross_layer,
    "cross-block": cross_block,
    "adjacent-layer": adjacent_layer,
    "adjacent-block": adjacent_block,
}


def layer_map(scheme: str, num_blocks: int) -> List[int]:
    """Conv parameter-set index of each of the 2 * num_blocks layers (dense, from 0)."""
    if scheme not in SCHEMES:
        raise ValueError(f"sharing scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return SCHEMES[scheme](num_blocks)
