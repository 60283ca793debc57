"""cprec-kernels: fused operators for compressed sequential recommenders.

Functional ops (each with an eager reference in ``cprec_kernels.reference`` and
backends chosen by ``backend=`` or ``$CPREC_BACKEND``), and ``nn.Module`` drop-ins in
``cprec_kernels.nn``.
"""
from .adaptive_softmax import adaptive_log_prob, adaptive_softmax_loss, adaptive_topk
from .backends import BACKENDS
from .conv import causal_conv1d, causal_conv1d_ln_relu
from .embedding import blockwise_embedding

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "adaptive_log_prob",
    "adaptive_softmax_loss",
    "adaptive_topk",
    "blockwise_embedding",
    "causal_conv1d",
    "causal_conv1d_ln_relu",
]
