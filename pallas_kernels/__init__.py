"""Pallas kernels for MoE: router/ (fused routing), permute/ (expert-order gather and
weighted combine), gmm/ (grouped matmuls). Each has kernel.py and an ops.py holding its
custom VJP; target.py picks Triton, Mosaic or the interpreter by platform."""
