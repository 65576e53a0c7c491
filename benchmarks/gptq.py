"""GPTQ time and peak memory on one 4096 x 4096 layer, JAX core vs a straightforward NumPy implementation of the
same algorithm (benchmarks/gptq_numpy.py), measured in the same process.

    python benchmarks/gptq.py [--k 4096] [--n 4096] [--tokens 2048]

Random W, Hessian from `tokens` random inputs; int4, groups of 128, blocksize 128, percdamp 0.01. The JAX time is
reported with and without compilation. Peak memory is the peak resident set size above the level before each run,
sampled every 5 ms. Prints a table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import threading
import time

import jax
import numpy as np
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gptq_numpy  # noqa: E402

import lowbit_jax as lb  # noqa: E402
from lowbit_jax.algorithms.gptq_core import gptq_core  # noqa: E402


class PeakRSS:
  """Context manager: the peak RSS (bytes) above the RSS at entry, sampled by a thread."""

  def __enter__(self):
    self._proc = psutil.Process()
    self.base = self._proc.memory_info().rss
    self.peak = self.base
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()
    return self

  def _watch(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      time.sleep(0.005)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)

  @property
  def delta_mb(self):
    return (self.peak - self.base) / 2**20


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=4096)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--tokens", type=int, default=2048)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
  x = rng.standard_normal((args.tokens, args.k)).astype(np.float32)
  h = x.T @ x / args.tokens
  spec = lb.int_spec(4, group_size=128)

  rows = []
  with PeakRSS() as mem:
    t0 = time.perf_counter()
    res = gptq_core(w, h, spec)
    jax.block_until_ready(res.q.codes)
    t_first = time.perf_counter() - t0
  rows.append(("JAX gptq_core (first call, with compile)", t_first, mem.delta_mb))
  with PeakRSS() as mem:
    t0 = time.perf_counter()
    res = gptq_core(w, h, spec)
    jax.block_until_ready(res.q.codes)
    t_jax = time.perf_counter() - t0
  rows.append(("JAX gptq_core (compiled)", t_jax, mem.delta_mb))
  with PeakRSS() as mem:
    t0 = time.perf_counter()
    ref = gptq_numpy.gptq_numpy(w, h, bits=4, group_size=128)
    t_np = time.perf_counter() - t0
  rows.append(("NumPy reference port (float64)", t_np, mem.delta_mb))

  deq = np.asarray(res.q.dequantize())
  err = lambda d: float(np.linalg.norm(x[:256] @ (w - d)))
  print(f"GPTQ int4 g128 on a {args.k}x{args.n} layer, Hessian from {args.tokens} tokens, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print("| implementation | time (s) | peak RSS above start (MiB) |")
  print("|---|---:|---:|")
  for name, t, m in rows:
    print(f"| {name} | {t:.2f} | {m:.0f} |")
  print(f"\nspeed-up of the compiled JAX core over NumPy: {t_np / t_jax:.2f}x "
        f"(with compile: {t_np / t_first:.2f}x)")
  print(f"output error on 256 tokens: JAX {err(deq):.4f}, NumPy {err(ref):.4f}, "
        f"RTN {err(np.asarray(lb.quantize(w, spec).dequantize())):.4f}")


if __name__ == "__main__":
  main()
