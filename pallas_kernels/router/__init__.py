"""Fused router: kernel.py (Pallas), ops.py (custom VJP)."""
