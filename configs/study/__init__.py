"""The reproduction study: one module per finding (docs/results.md), run by experiments.study."""
