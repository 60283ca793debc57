"""Eager PyTorch references of every op, forward and backward, in one namespace.

Each op's definition lives in its package (``cprec_kernels.conv.reference``,
``cprec_kernels.embedding.reference``, ``cprec_kernels.adaptive_softmax.reference``);
this module gathers them for readers and tests that want them side by side.
"""
from ._core.tensors import acc_dtype, mask_excluded
from .adaptive_softmax.reference import (
    adaptive_log_prob_backward,
    adaptive_log_prob_forward,
    adaptive_softmax_loss_backward,
    adaptive_softmax_loss_forward,
    adaptive_topk_forward,
)
from .conv.reference import (
    causal_conv1d_backward,
    causal_conv1d_forward,
    causal_conv1d_ln_relu_backward,
    causal_conv1d_ln_relu_forward,
)
from .embedding.reference import blockwise_embedding_backward, blockwise_embedding_forward, embedding_dim

__all__ = [
    "acc_dtype",
    "adaptive_log_prob_backward",
    "adaptive_log_prob_forward",
    "adaptive_softmax_loss_backward",
    "adaptive_softmax_loss_forward",
    "adaptive_topk_forward",
    "blockwise_embedding_backward",
    "blockwise_embedding_forward",
    "causal_conv1d_backward",
    "causal_conv1d_forward",
    "causal_conv1d_ln_relu_backward",
    "causal_conv1d_ln_relu_forward",
    "embedding_dim",
    "mask_excluded",
]
