"""Triton kernels (CUDA; verified on the CPU under TRITON_INTERPRET=1 and by ahead-of-time compiles)."""
