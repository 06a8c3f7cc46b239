"""The notebooks (notebooks/*.ipynb) run top to bottom in a fresh kernel, as `make
notebooks` runs them but at their runlocal sizes (MOE_JAX_RUNLOCAL=1), and show their
figures; a failing cell fails its notebook's test, naming the notebook and the cell. The
repository stores them without outputs."""
import base64
import importlib.util
import os

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "notebook_execute", os.path.join(ROOT, "notebooks", "execute.py"))
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

# Figures each executed notebook must show (PNG outputs): the loss curves and the load
# heat map; one side-by-side per analysis figure; the sweep's plot.
FIGURES = {"01_upcycle_and_compare": 0, "02_continued_training": 2,
           "03_what_the_experts_learned": 5, "04_sweeps": 1, "05_kernels_on_accelerators": 0}
NAMES = [os.path.basename(p)[:-len(".ipynb")] for p in execute.notebooks()]


def _pngs(nb) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code"
          for o in c.outputs if "image/png" in o.get("data", {})]


def test_every_notebook_is_listed_and_stored_without_outputs():
  assert NAMES == sorted(FIGURES)
  readme = open(os.path.join(ROOT, "README.md")).read()
  for path in execute.notebooks():
    assert os.path.basename(path) in readme, f"{path}: not in the README's tour"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), path
    assert "%pip install" in code[0].source and "find_spec" in code[0].source, path


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_and_shows_its_figures(name, tmp_path):
  out = execute.execute(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), str(tmp_path),
                        runlocal=True)
  nb = nbformat.read(out, as_version=4)
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
  pngs = _pngs(nb)
  assert len(pngs) == FIGURES[name]
  assert all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)  # drawn, not blank


def test_a_failing_cell_names_the_notebook_and_the_cell(tmp_path):
  nb = new_notebook(cells=[new_markdown_cell("# broken"), new_code_cell("x = 1"),
                           new_code_cell("import json\njson.loads('{not json')")])
  path = tmp_path / "broken.ipynb"
  nbformat.write(nb, str(path))
  with pytest.raises(execute.NotebookError) as e:
    execute.execute(str(path), str(tmp_path / "out"))
  msg = str(e.value)
  assert msg.startswith("broken.ipynb: cell 3 of 3 (`import json`) failed: JSONDecodeError:")
  assert "\n" not in msg
  assert os.path.exists(tmp_path / "out" / "broken.ipynb")  # the traceback is kept there
