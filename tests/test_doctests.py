"""The runnable examples in the public API's docstrings (`>>>` blocks) run and print what they say.

One test per module, `doctest.testmod` with ELLIPSIS | NORMALIZE_WHITESPACE; a failing example fails the test with
doctest's report (the example, what it expected, what it got). `ENTRY_POINTS` names the docstrings that must hold
an example, so deleting one fails too."""
import doctest
import importlib

import pytest

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

ENTRY_POINTS = {   # module: the functions / methods whose docstring holds an example
    "lowbit_jax.qarray": ("quantize", "QArray.dequantize"),
    "lowbit_jax.spec": ("int_spec", "nf4_spec"),
    "lowbit_jax.rtn": ("rtn",),
    "lowbit_jax.passes.calibration": ("calibrate",),
    "lowbit_jax.algorithms.gptq": ("gptq",),
    "lowbit_jax.memory": ("memory_report",),
    "lowbit_jax.passes.rewrite": ("quantized",),
}


def module(name: str):
  return importlib.import_module(name)   # not getattr: `lowbit_jax.rtn` the attribute is the function


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_has_an_example(name):
  found = {t.name: len(t.examples) for t in doctest.DocTestFinder().find(module(name))}
  missing = [f for f in ENTRY_POINTS[name] if not found.get(f"{name}.{f}")]
  assert not missing, f"{name}: no `>>>` example in the docstring of {missing}"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_docstring_examples_run(name, capsys):
  result = doctest.testmod(module(name), optionflags=FLAGS, report=True)
  report = capsys.readouterr().out
  assert result.attempted > 0, f"{name}: no doctest examples found"
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed\n{report}"


def test_a_wrong_example_fails(capsys):
  """The check can fail: an example whose printed output differs is reported with what it got."""
  test = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "wrong", "wrong.py", 0)
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  runner.run(test)
  assert runner.summarize(verbose=False).failed == 1
  assert "Expected:\n    3\nGot:\n    2" in capsys.readouterr().out
