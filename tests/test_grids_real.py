"""Issue 10's grid acceptance on the real stories260K weights and Hessians: symmetric GPTQ's output error on the
default grid is within 1 % of the IST-DASLab reference on its own grid (the NumPy port in benchmarks/), weight by
weight; the full-range grid and the clipping search lower RTN's output error against the restricted grid."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms.gptq_core import gptq_core
from passhelpers import dequantized
from qhelpers import quantize

_spec = importlib.util.spec_from_file_location(
    "gptq_numpy", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gptq_numpy.py")
gptq_numpy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gptq_numpy)


@pytest.fixture(scope="module")
def items(stories260k):
  """[(name, W (K, N) float64, H (K, K) float64)] for the 35 linear weights, from the first 16 x 128 training
  tokens in 4 batches of 4 windows."""
  ids = stories260k.train[: 16 * 128].reshape(16, 128)
  calib = lb.calibrate(stories260k.apply, stories260k.params, [jnp.asarray(ids[i:i + 4]) for i in range(0, 16, 4)])
  flat = {p: np.asarray(w, np.float64) for p, w in jax.tree_util.tree_flatten_with_path(stories260k.params)[0]}
  return [(str(p), flat[p], np.asarray(calib[p].stats.xtx, np.float64)) for p in calib]


def _out_err(w, deq, h):
  d = deq - w
  return float(np.einsum("kn,kl,ln->", d, h, d))


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, None)])
def test_symmetric_gptq_within_1pct_of_the_reference_on_its_grid(items, bits, group_size):
  """The default grid (SIGNED_MAX) on average at most 1 % above the reference on its own grid (FULL); on the same
  grid, the two agree weight by weight."""
  assert len(items) == 35
  default, same_grid = [], []
  for name, w, h in items:
    ref = _out_err(w, gptq_numpy.gptq_numpy(w, h, bits=bits, group_size=group_size, sym=True,
                                            grid=lb.SymGrid.FULL), h)
    for grid, out in ((lb.DEFAULT_SYM_GRID, default), (lb.SymGrid.FULL, same_grid)):
      q = gptq_core(w.astype(np.float32), h.astype(np.float32), lb.int_spec(bits, group_size=group_size, grid=grid))
      out.append(_out_err(w, np.asarray(dequantized(q.q), np.float64), h) / ref)
  default, same_grid = np.asarray(default), np.asarray(same_grid)
  assert default.mean() <= 1.01, default
  assert np.all(np.abs(same_grid - 1) <= 0.03), (items[int(np.abs(same_grid - 1).argmax())][0], same_grid)


@pytest.mark.parametrize("bits, group_size", [(4, None), (3, 32), (2, 32)])
def test_full_range_and_clip_search_lower_rtn_output_error(items, bits, group_size):
  def total(**kw):
    spec = lb.int_spec(bits, group_size=group_size, **kw)
    return sum(_out_err(w, np.asarray(dequantized(quantize(w.astype(np.float32), spec)), np.float64), h)
               for _, w, h in items)

  restricted = total(grid=lb.SymGrid.RESTRICTED)
  full = total(grid=lb.SymGrid.FULL)
  default = total()
  clipped = total(clip=lb.ClipSearch())
  assert default < full < restricted or (bits == 4 and default < restricted), (default, full, restricted)
  assert clipped < default, (clipped, default)
