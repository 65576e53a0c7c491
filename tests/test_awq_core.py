"""AWQ core on random layers with outlier input channels: the scale and clip searches lower the output error
below RTN's, the Hessian score equals the explicit output MSE, and the float function is unchanged by s."""
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms import awq_core


def _layer(k=128, n=(48, 32), tokens=1024, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, k)).astype(np.float32)
  x *= np.where(rng.random(k) < 0.05, 20.0, 1.0).astype(np.float32)     # salient input channels
  ws = [(rng.standard_normal((k, m)) * 0.05).astype(np.float32) for m in n]
  return x, ws, x.T @ x / tokens, np.abs(x).mean(0)


def test_hessian_score_is_the_output_mse():
  x, (w, _), h, _ = _layer()
  dw = np.random.default_rng(1).standard_normal(w.shape).astype(np.float32) * 1e-2
  np.testing.assert_allclose(float(awq_core.output_error(jnp.asarray(dw), jnp.asarray(h))),
                             np.sum((x @ dw) ** 2) / x.shape[0], rtol=1e-4)


@pytest.mark.parametrize("bits, group_size", [(4, None), (4, 32), (3, 32)])
def test_scale_and_clip_beat_rtn(bits, group_size):
  x, ws, h, mean_abs = _layer()
  spec = lb.int_spec(bits, group_size=group_size)
  search = awq_core.search_scale(ws, h, mean_abs, spec)
  assert search.losses.shape == (20,) and 0.0 <= search.alpha < 1.0
  assert search.losses.min() < search.losses[0]          # α = 0 is plain RTN
  s = np.asarray(search.scale)
  for w in ws:
    rtn = np.asarray(lb.quantize(w, spec).dequantize())
    scaled = np.asarray(lb.quantize(w * s[:, None], spec).dequantize()) / s[:, None]
    clipped = np.asarray(awq_core.search_clip(w * s[:, None], h / np.outer(s, s), spec))
    both = np.asarray(lb.quantize(clipped, spec).dequantize()) / s[:, None]
    err = lambda d: np.linalg.norm(x @ (w - d))
    assert err(scaled) < err(rtn)
    assert err(both) <= err(scaled) * 1.0001
    # the float function is unchanged by s: x @ w == (x / s) @ (s * w)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-3, atol=1e-3)


def test_clip_never_worse_than_no_clip_per_block():
  x, (w, _), h, _ = _layer(seed=2)
  spec = lb.int_spec(3, group_size=32)
  clipped = np.asarray(awq_core.search_clip(w, h, spec))
  assert np.all(np.abs(clipped) <= np.abs(w) + 1e-7)
  e = lambda d: np.linalg.norm(x @ (w - d))
  assert e(np.asarray(lb.quantize(clipped, spec).dequantize())) < e(np.asarray(lb.quantize(w, spec).dequantize()))


def test_bad_shapes():
  _, ws, h, m = _layer()
  with pytest.raises(ValueError, match="must be"):
    awq_core.search_scale([ws[0][:64]], h, m, lb.int_spec(4))
