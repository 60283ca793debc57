"""cprec-kernels: fused operators for compressed sequential recommenders.

One package per op (``conv``, ``embedding``, ``adaptive_softmax``), each holding its
public functions, its eager reference (the definition; gathered in
``cprec_kernels.reference``) and its backends, chosen by ``backend=`` or
``$CPREC_BACKEND``; ``nn.Module`` drop-ins in ``cprec_kernels.nn``.
"""
from ._core.backends import BACKENDS
from ._core.tensors import acc_dtype, mask_excluded
from .adaptive_softmax import adaptive_log_prob, adaptive_softmax_loss, adaptive_topk
from .conv import causal_conv1d, causal_conv1d_ln_relu
from .embedding import blockwise_embedding

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "acc_dtype",
    "adaptive_log_prob",
    "adaptive_softmax_loss",
    "adaptive_topk",
    "blockwise_embedding",
    "causal_conv1d",
    "causal_conv1d_ln_relu",
    "mask_excluded",
]
