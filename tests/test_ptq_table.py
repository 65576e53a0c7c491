"""experiments/ptq_table.py on a tiny config: packed evaluation, metrics, .md and .png, calibration windows."""
import dataclasses
import importlib
import itertools
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.eval import perplexity

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def ptq():
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    yield importlib.import_module("ptq_table")
  finally:
    sys.path.remove(str(EXPERIMENTS))


def _table(text: str) -> dict[str, list[str]]:
  """The results table of a ptq_table.md, {method label: its other cells}; every row as wide as the header."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
  rows = [line.strip("| ").split(" | ") for line in itertools.takewhile(lambda l: l.startswith("|"), lines[start:])]
  assert rows[1][0] == "---" and all(len(r) == len(rows[0]) for r in rows)
  return {r[0]: r[1:] for r in rows[2:]}


def _assert_plot(path: Path, panels: int) -> None:
  """The png decodes to the figure's size (6.5 x 4.8 inches per panel at 120 dpi) and is not one flat colour."""
  from matplotlib.image import imread
  img = imread(path)
  assert img.shape == (576, 780 * panels, 4) and img.dtype == np.float32
  assert len(np.unique(img.reshape(-1, 4), axis=0)) > 10


@pytest.mark.assets
def test_tiny_table(ptq, tmp_path):
  M, Row = ptq.Method, ptq.Row
  cfg = dataclasses.replace(
      ptq.CONFIG, rows=(Row(M.FP32), Row(M.RTN, 4, 32)), max_windows=2, batch_size=2, seq_len=128,
      calib_windows=4, calib_len=64, calib_batch=2, out_dir=tmp_path)
  results, skipped = ptq.main(cfg)
  assert not skipped
  fp32, rtn = results
  assert fp32.kl == pytest.approx(0.0, abs=1e-6) and fp32.top1 == 1.0
  assert fp32.bits_linear == 32.0 and fp32.quant_seconds == 0.0
  assert 0 < rtn.kl and 0.5 < rtn.top1 < 1.0
  assert 5.0 <= rtn.bits_linear < 5.2   # 4-bit codes + a f32 scale per 32 weights, w2's K = 172 padded to 192
  # the fp32 row's perplexity is lowbit_jax.eval.perplexity's on the same windows
  setup = ptq.load(cfg)
  for ds, ppl in zip(cfg.eval_sets, fp32.ppl):
    windows, n = ptq.eval_windows(cfg, ds, setup.tokenizer)
    ref = perplexity(setup.apply, setup.params, windows[:n].reshape(-1), seq_len=128, batch_size=2, progress=False)
    assert math.isclose(ppl, ref.ppl, rel_tol=1e-5) and np.isfinite(rtn.ppl).all()
  text = (tmp_path / "ptq_table.md").read_text()
  assert "first 2 windows of 128 tokens" in text
  assert "AWQ w4 g32: ppl below RTN w4 g32 | n/a (row missing)" in text
  assert "Calibration: none." in text   # no calibrated row: no calibration
  table = _table(text)
  assert list(table) == [r.row.label for r in results]
  for r in results:   # every cell is the computed value, rounded to the digits it shows
    want = [*r.ppl, r.kl, 100 * r.top1, r.bits_linear, r.bits_model, r.quant_seconds]
    assert len(table[r.row.label]) == len(want)
    for cell, value in zip(table[r.row.label], want):
      shown = cell.removesuffix(" %")
      assert abs(float(shown) - value) <= 0.5001 * 10.0 ** -len(shown.partition(".")[2]), (r.row.label, cell, value)
  _assert_plot(tmp_path / "ptq_table.png", len(cfg.eval_sets))
  assert jnp.asarray(ptq.calibration_batches(cfg, setup.tokenizer)[0]).shape == (2, 64)
