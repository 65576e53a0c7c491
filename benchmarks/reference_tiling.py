"""Memory and time of the weight-only reference `qmatmul`: tiled (decodes one K-tile at a time) vs untiled.

    python benchmarks/reference_tiling.py [--k 4096] [--n 4096] [--iters 7]

For one int4-g128 weight (4096 x 4096 by default) and M in {1, 16, 256}, prints a markdown table, side by side
for the old untiled reference (`_untiled_reference`, a copy of the implementation before tiling, which unpacks the
whole weight to float32) and the current `kernels.qmatmul.reference.qmatmul`:

  * temp MiB: XLA's temporary allocation of the compiled function
    (`jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`);
  * max float buffer MiB: the largest float value in the jaxpr (sub-jaxprs included), 4 bytes per element;
  * ms: median wall time of `--iters` calls after a warm-up (`jax.block_until_ready`);
  * max rel diff: max |old - new| / max |old| (float rounding only).

Ratios are old / new (> 1: the tiled reference uses less memory or time). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import lowbit_jax as lb  # noqa: E402
from lowbit_jax.kernels.qmatmul import reference  # noqa: E402
from lowbit_jax.formats import FORMATS  # noqa: E402
from lowbit_jax.qarray import QArray  # noqa: E402
from passhelpers import max_float_buffer  # noqa: E402
from kernels import median_ms  # noqa: E402  (benchmarks/kernels.py, this script's folder)

MS = (1, 16, 256)
MIB = 2.0 ** 20


def _untiled_reference(x, w: QArray):
  """The reference before tiling (for comparison only): unpacks every code of w to float32 on each call."""
  k_pad, n_groups = w.k_pad, w.n_groups
  vals = FORMATS[w.spec.format].decode(w.unpacked_codes(), w.zero, w.spec)   # (K_pad, N) f32 (int4 g128 sym)
  xp = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, k_pad - w.k)])   # (..., K_pad)
  xg = xp.reshape(x.shape[:-1] + (n_groups, k_pad // n_groups))              # (..., G, g)
  vg = vals.reshape(n_groups, k_pad // n_groups, -1)                         # (G, g, N)
  partial = jnp.einsum("...gk,gkn->...gn", xg, vg, preferred_element_type=jnp.float32)   # (..., G, N)
  scale = jnp.broadcast_to(w.scale_values(), (n_groups, vals.shape[-1]))    # (G, N)
  out = jnp.einsum("...gn,gn->...n", partial, scale, preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def _measure(fn, x, w, iters: int) -> dict:
  f = jax.jit(fn)
  temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
  buf = max_float_buffer(jax.make_jaxpr(fn)(x, w)) * 4
  return dict(temp=temp, buf=buf, ms=median_ms(f, x, w, iters=iters))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--k", type=int, default=4096)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--iters", type=int, default=7)
  args = ap.parse_args()
  spec = lb.int_spec(4, group_size=128)
  w = jax.jit(lb.quantize, static_argnums=1)(jax.random.normal(jax.random.PRNGKey(0), (args.k, args.n)), spec)
  jax.block_until_ready(w)
  p = reference.plan(w)
  print(f"# weight-only reference qmatmul, int4 g128 weight {args.k} x {args.n} ({w.nbytes / MIB:.1f} MiB stored, "
        f"{args.k * args.n * 4 / MIB:.0f} MiB as float32), {jax.devices()[0].platform}, jax {jax.__version__}")
  print(f"# tiling: {p.chunks} chunks x {p.steps} steps of {p.rows} code rows (float tile "
        f"{p.rows * args.n * 4 / MIB:.1f} MiB)\n")
  print("| M | temp MiB old | temp MiB new | temp ratio | max float buf MiB old | max float buf MiB new "
        "| buf ratio | ms old | ms new | time ratio | max rel diff |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for m in MS:
    x = jax.random.normal(jax.random.PRNGKey(m), (m, args.k))
    old = _measure(_untiled_reference, x, w, args.iters)
    new = _measure(reference.qmatmul, x, w, args.iters)
    a, b = jax.jit(_untiled_reference)(x, w), jax.jit(reference.qmatmul)(x, w)
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    print(f"| {m} | {old['temp'] / MIB:.1f} | {new['temp'] / MIB:.1f} | {old['temp'] / max(new['temp'], 1):.1f}x "
          f"| {old['buf'] / MIB:.1f} | {new['buf'] / MIB:.1f} | {old['buf'] / max(new['buf'], 1):.1f}x "
          f"| {old['ms']:.1f} | {new['ms']:.1f} | {old['ms'] / new['ms']:.2f}x | {err:.1e} |", flush=True)


if __name__ == "__main__":
  main()
