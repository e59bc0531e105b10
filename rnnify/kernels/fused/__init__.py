"""Fused Triton kernels (CUDA, or any device under ``TRITON_INTERPRET=1``). Each op has a twin in
``rnnify.kernels.reference`` with the same signature; ``rnnify.kernels`` picks between them."""
