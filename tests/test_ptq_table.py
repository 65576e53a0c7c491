"""experiments/ptq_table.py on a tiny config: packed evaluation, metrics, .md and .png, calibration windows."""
import dataclasses
import importlib
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
  assert "| RTN w4 g32 |" in text and "first 2 windows of 128 tokens" in text
  assert "AWQ w4 g32: ppl below RTN w4 g32 | n/a (row missing)" in text
  assert "Calibration: none." in text   # no calibrated row: no calibration
  assert (tmp_path / "ptq_table.png").stat().st_size > 10_000
  assert jnp.asarray(ptq.calibration_batches(cfg, setup.tokenizer)[0]).shape == (2, 64)
