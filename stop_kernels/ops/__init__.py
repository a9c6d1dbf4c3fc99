"""Fused ops: one module per op holding its Triton kernels, launch wrappers and autograd.Function.

* :mod:`.philox`          the StoP noise stream shared by every backend
* :mod:`.stop_embed`      ψ[idx] + A·n + b with n generated in registers
* :mod:`.predictor_input` the I-JEPA+StoP predictor input assembly
* :mod:`.attention`       flash attention for the encoder and predictor shapes
* :mod:`.linear_gelu`     a forward-only MLP projection with bias and GELU in the GEMM's epilogue (cuBLASLt)
* :mod:`.cuda_backend`    the CUDA C++ StoP kernels (``stop_kernels._C``), when built
"""
