"""Build the research notebooks: each `notebooks/<name>.py` (jupytext "percent" format: `# %%` cells, the text that
is reviewed) is converted, executed from a fresh kernel (working directory notebooks/) and written beside it with
its outputs as `notebooks/<name>.ipynb`.

    python notebooks/build.py                    # every notebook
    python notebooks/build.py 01_quickstart      # some of them

tests/test_notebooks.py executes the same sources the same way (`execute`) and checks the committed .ipynb against
them: the same cells, every code cell executed, and the same text output in the cells tagged "deterministic"
(`# %% tags=["deterministic"]`: seeded computations that print the same numbers on every run).

The kernel gets this process's environment without the test suite's forced host device count (XLA_FLAGS): a
notebook runs as a user's session would, on one CPU device. Progress bars (tqdm, on stderr) are kept as a terminal
shows them: each line's last carriage-return segment, cleared bars dropped.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NAMES = tuple(sorted(p.stem for p in HERE.glob("[0-9][0-9]_*.py")))
DETERMINISTIC = "deterministic"     # the tag of cells whose text output must reproduce exactly
CELL_TIMEOUT_S = 300


def source(name: str) -> nbformat.NotebookNode:
  """The notebook of `notebooks/<name>.py`, unexecuted, with stable cell ids (cell-0, cell-1, ...)."""
  nb = jupytext.read(HERE / f"{name}.py", fmt="py:percent")
  nb.metadata = nbformat.NotebookNode(kernelspec={"name": "python3", "display_name": "Python 3",
                                                  "language": "python"})
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i}"
  return nb


def kernel_env() -> dict[str, str]:
  """This process's environment, less the forced host device count (tests/conftest.py sets 8) and a non-inline
  matplotlib backend, and tqdm's warning that ipywidgets is missing silenced."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env.pop("MPLBACKEND", None)
  # tqdm.auto in a kernel without ipywidgets warns once and falls back to its terminal bars: a fact about this
  # environment, not about the notebook
  env["PYTHONWARNINGS"] = ",".join(filter(None, (env.get("PYTHONWARNINGS"), "ignore:IProgress not found")))
  return env


def _terminal_text(text: str) -> str:
  """What a terminal shows of a stream with carriage returns: each line's last segment; blank lines (cleared
  progress bars) dropped."""
  lines = [line.split("\r")[-1] for line in text.split("\n")]
  return "".join(line + "\n" for line in lines if line.strip())


def _tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """Consecutive stream outputs of one cell merged (a progress bar sends one message per update); stderr kept as a
  terminal shows it."""
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    outputs = []
    for out in cell.outputs:
      last = outputs[-1] if outputs else None
      if out.output_type == "stream" and last is not None and last.output_type == "stream" and last.name == out.name:
        last.text += out.text
      else:
        outputs.append(out)
    for out in outputs:
      if out.output_type == "stream" and out.name == "stderr":
        out.text = _terminal_text(out.text)
    cell.outputs = [o for o in outputs if o.output_type != "stream" or o.text]
  return nb


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """Runs every cell of `nb` in order in a fresh python3 kernel (cwd notebooks/); raises nbclient's
  CellExecutionError, with the cell and its traceback, at the first error."""
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                          resources={"metadata": {"path": str(HERE)}})
  client.execute(env=kernel_env())
  return _tidy(nb)


def deterministic_outputs(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
  """(cell source, its text output) of every cell tagged DETERMINISTIC: stdout and the text/plain results, in
  order; stderr, images and HTML are not compared."""
  out = []
  for cell in nb.cells:
    if cell.cell_type == "code" and DETERMINISTIC in cell.metadata.get("tags", []):
      text = "".join(o.text if o.output_type == "stream" and o.name == "stdout" else
                     o.get("data", {}).get("text/plain", "") + "\n" if o.output_type == "execute_result" else ""
                     for o in cell.outputs)
      out.append((cell.source, text))
  return out


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def build(name: str) -> tuple[float, float]:
  """Executes notebooks/<name>.py and writes notebooks/<name>.ipynb; returns (wall seconds, kernel CPU seconds)."""
  t0, c0 = time.perf_counter(), _children_cpu_s()
  nb = execute(source(name))
  nbformat.write(nb, HERE / f"{name}.ipynb")
  return time.perf_counter() - t0, _children_cpu_s() - c0


def main(argv: list[str]) -> None:
  names = argv or list(NAMES)
  unknown = sorted(set(names) - set(NAMES))
  if unknown:
    raise SystemExit(f"unknown notebooks {unknown}; known: {list(NAMES)}")
  for name in names:
    wall, cpu = build(name)
    print(f"{name}: executed and written in {wall:.1f} s ({cpu:.1f} s of kernel CPU)", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
