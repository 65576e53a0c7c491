"""The README's quickstart runs as written (on the real stories260K model)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_runs(capsys):
  text = (ROOT / "README.md").read_text()
  block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
  exec(compile(block, "README.md quickstart", "exec"), {})
  out = capsys.readouterr().out
  assert "bits/weight" in out and "QArray(shape=(64, 64)" in out
  assert "35 quantized weights, 0 dequantized at run time" in out        # the run report: everything packed
