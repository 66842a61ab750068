"""Triton kernels and their launchers, installed as ``ddim_gmm_ext.triton_kernels``.

Importing this package needs triton; ``ddim_gmm_ext`` imports it only when a CUDA device is in use or when
tests run the kernels under ``TRITON_INTERPRET=1``.
"""
