"""Triton kernels, one module per op (``conv``, ``embedding``, ``adaptive_softmax``).

Each module implements functions of ``cprec_kernels.reference`` under the same names;
``cprec_kernels.backends`` finds them. Importing a module here needs ``triton``.
"""
