"""What the experts learned (Look-into-MoEs, arXiv 2406.18219, and distance to the base):
pure numpy functions per family (weights, neurons, router, pca, distance, dynamic), one
layer's static analyses (static), the driver over a checkpoint (run) and the figures and
report (report). experiments/analyze.py is the binary."""
