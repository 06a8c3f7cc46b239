"""Figures written to files, made without pyplot: the library never switches matplotlib's
backend or keeps figures in pyplot's registry, so a notebook's own inline plots keep
working after an analysis or a sweep has written its PNGs."""
from __future__ import annotations


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, layout=None, **kwargs):
  """(figure, axes) like pyplot.subplots, on a Figure that only savefig renders."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize, layout=layout)
  return fig, fig.subplots(nrows, ncols, **kwargs)
