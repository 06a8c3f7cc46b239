"""Token permutation into expert order and the weighted combine back: kernel.py, ops.py."""
