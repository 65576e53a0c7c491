"""experiments/sparsity_vs_quant.py: the bitmap bits formula, the Pareto front, the per-budget winner and the checks
on synthetic rows; a tiny run on stories260K (bytes of a Sparse24 row against an independent count, packed execution
equal to the evaluated float view, files written outside experiments/results)."""
import importlib
import itertools
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def svq():
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    yield importlib.import_module("sparsity_vs_quant")
  finally:
    sys.path.remove(str(EXPERIMENTS))


def _result(svq, label, family, bits, ppl, formula=False):
  return svq.Result(label, family, formula, tuple(ppl), 0.1, 0.9, bits, bits, bits, 1.0)


def test_bitmap_bits_formula(svq):
  assert svq.bitmap_bits(16 * 1000, 1000, 500, 16) == 9 * 1000        # float16 at 50 %: 0.5 x 16 + 1
  assert svq.bitmap_bits(8 * 1000, 1000, 1000, 8) == 9 * 1000         # dense: only the mask is added
  # int4 codes with a float32 scale per 32 weights (5 b/w stored) at 50 %: 0.5 x 4 + 1 + 1
  assert svq.bitmap_bits(5 * 1024, 1024, 512, 4) == 4 * 1024


def test_plot_bits_counts_the_zeros_of_every_linear_weight(svq):
  w = jax.random.normal(jax.random.key(0), (64, 32))
  half = jnp.where(jnp.arange(64)[:, None] % 2 == 0, 0.0, w)                          # exactly 50 % zeros
  q = lb.quantize(half, lb.int_spec(4, group_size=32))                               # 4-bit codes + f32 scales
  tree = {"a": {"kernel": half.astype(jnp.float16)}, "b": {"kernel": q},
          "emb": {"embedding": jnp.ones((10, 8))}}                                    # not linear: ignored
  nnz = int(np.count_nonzero(np.asarray(q.dequantize())))
  assert nnz <= 1024
  q_bits = 8 * (64 * 32 // 2 + 2 * 32 * 4) - (2048 - nnz) * 4 + 2048
  want = (9 * 2048 + q_bits) / 4096
  assert svq.plot_bits(tree, frozenset({"a/kernel", "b/kernel"})) == pytest.approx(want, rel=1e-12)
  assert svq.plot_bits(tree, frozenset({"a/kernel"})) == 9.0


def test_pareto_front(svq):
  bits = [32.0, 16.0, 9.0, 9.0, 5.0, 4.1, 4.0, 3.5]
  ppl = [3.9, 3.9, 30.0, 17.0, 4.5, 5.7, 38.0, 60.0]
  front = svq.pareto_front(bits, ppl)
  assert front == [7, 6, 5, 4, 1]                          # by increasing bits; 32 b/w only ties 16 b/w: not on it
  assert [bits[i] for i in front] == sorted(bits[i] for i in front)
  assert svq.pareto_front([], []) == []
  assert svq.pareto_front([4.0, 4.0], [2.0, 1.0]) == [1]   # the same bits: only the better one


def test_winner_per_budget_and_checks(svq):
  F = svq.Family
  res = [_result(svq, "GPTQ int8 per-channel", F.DENSE_QUANT, 8.4, [3.93, 90.4]),
         _result(svq, "SparseGPT 50 % fp16", F.SPARSE_FP16, 9.0, [17.7, 166.0], formula=True),
         _result(svq, "magnitude 50 % fp16", F.SPARSE_FP16, 9.0, [30.3, 150.0], formula=True),
         _result(svq, "SparseGPT 2:4 fp16", F.SPARSE_FP16, 9.006, [35.1, 219.0]),
         _result(svq, "GPTQ int4 g32", F.DENSE_QUANT, 5.14, [4.49, 85.0]),
         _result(svq, "SparseGPT 2:4 + int4 g32 (joint)", F.SPARSE_QUANT, 4.09, [38.6, 306.8]),
         _result(svq, "fp32 (unpruned)", F.FLOAT, 32.0, [3.9, 89.6])]
  assert svq.best_within(res, 9.25, 0).label == "GPTQ int8 per-channel"
  assert svq.best_within(res, 9.25, 1).label == "GPTQ int4 g32"                  # int8 loses on set 1
  assert svq.best_within(res, 9.0, 0, F.SPARSE_FP16).label == "SparseGPT 50 % fp16"   # 9.006 is over 9.0
  assert svq.best_within(res, 9.25, 1, F.SPARSE_FP16).label == "magnitude 50 % fp16"
  assert svq.best_within(res, 4.5, 0).label == "SparseGPT 2:4 + int4 g32 (joint)"
  assert svq.best_within(res, 4.0, 0) is None and svq.best_within(res, 6.0, 0, F.FLOAT) is None
  lines = svq.winners(res, ["A", "B"])
  assert len(lines) == 2 * len(svq.BUDGETS)
  assert lines[0].startswith("* **about 9 b/w** (at most 9.25), A: **GPTQ int8 per-channel** (dense quant), ppl "
                             "3.9300 at 8.400 b/w (best sparse fp16: SparseGPT 50 % fp16 17.7000 at 9.000; best "
                             "sparse + quant: SparseGPT 2:4 + int4 g32 (joint) 38.6000 at 4.090).")
  checks = svq.checks(res, ["A", "B"])
  assert checks[2] == ("| SparseGPT 50 % fp16: perplexity below magnitude 50 % fp16 | PASS (17.7000 vs 30.3000) | "
                       "FAIL (166.0000 vs 150.0000) |")
  assert checks[3] == ("| SparseGPT 2:4 fp16: perplexity below magnitude 2:4 fp16 | n/a (row missing) | "
                       "n/a (row missing) |")


def test_row_labels_are_what_the_checks_look_up(svq):
  labels = [r.label for r in svq.rows(32)]
  assert len(set(labels)) == len(labels) == 14
  for name in ("SparseGPT 50 % fp16", "magnitude 50 % fp16", "SparseGPT 2:4 fp16", "magnitude 2:4 fp16",
               "SparseGPT 2:4 + int4 g32 (joint)", "magnitude 2:4 + RTN int4 g32", "GPTQ int3 g32"):
    assert name in labels
  assert {r.family for r in svq.rows(128)} == set(svq.Family)
  assert [r.label for r in svq.rows(128) if r.verify] == ["GPTQ int4 g128", "SparseGPT 2:4 fp16",
                                                           "SparseGPT 2:4 + int4 g128 (joint)"]


@pytest.mark.assets
def test_tiny_run_on_stories260k(svq, tmp_path):
  S, P = svq.Store, svq.Prune
  row_list = (svq.Row(P.NONE, None, S.FP32), svq.Row(P.MAGNITUDE, svq.TWO_FOUR, S.RTN, lb.int_spec(4, group_size=32),
                                                     "int4 g32", verify=True),
              svq.Row(P.MAGNITUDE, svq.HALF, S.FP16))
  results, info = svq.main(svq.Model.STORIES260K, quick=True, out_dir=tmp_path, row_list=row_list)
  assert info.done and not info.skipped
  fp32, two_four, half = results
  assert fp32.kl == pytest.approx(0.0, abs=1e-6) and fp32.top1 == 1.0 and fp32.bits_stored == 32.0
  # per layer, the K = 64 weights (wq, wk, wv, wo, w1, w3): 32 kept 4-bit codes, 2 f32 scales and 8 bytes of
  # positions per column = 4 b/w; w2 (172 x 64): codes of 96 kept rows (192 padded / 2), 6 scales, 22 position rows
  k64 = 64 * (64 + 32 + 32 + 64 + 172 + 172)
  want = (4 * k64 + 8 * 64 * (96 // 2 + 6 * 4 + 22)) / (k64 + 172 * 64)
  assert two_four.bits_stored == pytest.approx(want, rel=1e-9) and 4.09 < want < 4.1
  assert two_four.bits_plot == two_four.bits_stored and not two_four.formula
  assert half.bits_stored == 16.0 and half.formula and 8.99 < half.bits_plot <= 9.0
  assert two_four.ppl[0] > fp32.ppl[0] and two_four.kl > 0 and 0 < two_four.top1 < 1
  [(label, what)] = info.verify
  parsed = re.fullmatch(r"max \|logit difference\| (\S+) \(max \|logit\| (\S+)\)", what)
  diff, peak = (float(w) for w in parsed.groups())
  assert label == "magnitude 2:4 + RTN int4 g32" and diff < 1e-5 * peak and peak > 1
  md = (tmp_path / "sparsity_vs_quant_stories260k_quick.md").read_text()
  assert "n/a (row missing) |" in md and svq.st.PARTIAL not in md and f"* {label}: {what}" in md
  assert _table_rows(md) == ["magnitude 2:4 + RTN int4 g32", "magnitude 50 % fp16", "fp32 (unpruned)"]  # by bits
  from matplotlib.image import imread
  img = imread(tmp_path / "sparsity_vs_quant_stories260k_quick.png")
  assert img.shape[1] > img.shape[0] and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10
  assert not (svq.RESULTS / "sparsity_vs_quant_stories260k_quick.md").exists()
  assert all(math.isfinite(p) for r in results for p in r.ppl)


def _table_rows(md: str) -> list[str]:
  """The row labels of the results table; every line of it as wide as its header."""
  lines = md.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
  rows = [line.strip("| ").split(" | ") for line in itertools.takewhile(lambda l: l.startswith("|"), lines[start:])]
  assert rows[1][0] == "---" and all(len(r) == len(rows[0]) for r in rows)
  return [r[0] for r in rows[2:]]
