"""Grouped matmul (gmm) and its transpose (tgmm): kernel.py (Triton / megablox), ops.py (VJP)."""
