"""notebooks/: each committed .ipynb is its jupytext source (notebooks/<name>.py) executed. The committed notebook has
exactly the source's cells, every code cell executed in order; the source, executed from a clean kernel
(notebooks/build.py's `execute`: a fresh python3 kernel, cwd notebooks/), raises nothing (each notebook ends with
an assertion cell) and prints, in its cells tagged "deterministic", exactly what the committed notebook shows:
no stale outputs. Rebuild with `python notebooks/build.py [names]`."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ("01_quickstart", "02_your_own_model", "03_zoo", "04_training", "05_sparsity_vs_quant",
            "06_gguf_round_trip")


def _load_build():
  spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build = _load_build()


def _committed(name: str) -> nbformat.NotebookNode:
  path = NOTEBOOKS / f"{name}.ipynb"
  assert path.is_file(), f"{path} is missing: run `python notebooks/build.py {name}`"
  return nbformat.read(path, as_version=4)


def _cells(nb) -> list[tuple[str, str, tuple]]:
  return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_every_notebook_has_a_source_and_a_committed_notebook():
  assert build.NAMES == EXPECTED
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == list(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_is_its_source_executed(name):
  src, nb = build.source(name), _committed(name)
  assert _cells(nb) == _cells(src), f"{name}.ipynb differs from {name}.py: run `python notebooks/build.py {name}`"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}.ipynb: not executed in order"
  assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{name}.ipynb holds an error"
  last = code[-1]
  assert build.DETERMINISTIC in last.metadata.get("tags", ()) and "assert " in last.source, \
      f"{name}: the last code cell must be a deterministic assertion cell"
  assert all(text for _, text in build.deterministic_outputs(nb)), f"{name}: a deterministic cell prints nothing"


@pytest.mark.assets
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes_and_reproduces_its_outputs(name):
  fresh = build.execute(build.source(name))       # raises CellExecutionError (cell and traceback) on any error
  want, got = build.deterministic_outputs(_committed(name)), build.deterministic_outputs(fresh)
  assert len(got) == len(want)
  for (source, w), (_, g) in zip(want, got):
    assert g == w, f"{name}: stale output in the cell\n{source}\n--- committed ---\n{w}\n--- now ---\n{g}"
