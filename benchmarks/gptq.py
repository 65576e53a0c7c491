"""GPTQ time and peak memory per layer, JAX core vs a straightforward NumPy implementation of the same algorithm
(benchmarks/gptq_numpy.py) and vs the algorithm's FLOP floor on this machine, all measured in one process.

    python benchmarks/gptq.py [--k 4096] [--n 4096,11008] [--tokens 2048] [--repeats 3] [--no-numpy]
                              [--numpy-n 4096] [--baseline GIT_REV]

For each N: random W (K, N) (Flax layout: K inputs, N outputs), Hessian from `tokens` random inputs; int4, groups
of 128, blocksize B = 128, percdamp 0.01, no act-order. The JAX core gets W and H as JAX arrays (as the GPTQ pass
holds them) and is timed on its first call (compilation included) and compiled (the least of `repeats` calls),
validation and host syncs included. The NumPy port (float64, Python loop over columns) is timed once, for the N
in --numpy-n (default: all). Peak memory is the peak resident set size above the level before a run, sampled
every 5 ms by a thread; the sampler costs a few percent of speed, so the compiled and NumPy times come from runs
without it and their memory from one more run each; the first call is timed with it running. With --baseline,
`gptq_core` as of that git revision is timed too (compiled, interleaved with ours), for old-vs-new in one run.

The floor is the lazy-batch algorithm's arithmetic divided by this machine's float32 matrix-product rate
(`jnp.dot` of two 4096 x 4096 matrices, measured in the same run, best of 3):

    FLOPs = K³/3 (Cholesky of H) + K³/3 (triangular inverse) + K³/3 (Cholesky of H^-1)   the reference's route
          + 2 N B (B+1)/2 per block (in-block column updates, remaining columns only)   = N K (B + 1)
          + 2 N B (K - i2) per block (lazy updates of the remaining columns only)      = N K (K - B)
          ≈ K³ + N K²,

counted as if all of it ran at the matrix-product rate (Cholesky, triangular solves and the rank-1 updates run
slower per flop than a product, so the floor is not reachable exactly). Prints a table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gptq_numpy  # noqa: E402

import lowbit_jax as lb  # noqa: E402
from lowbit_jax.algorithms.gptq_core import gptq_core  # noqa: E402

BLOCKSIZE = 128


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


def matmul_rate(size=4096, repeats=3):
  """float32 GFLOP/s of one jitted size x size x size product (best of `repeats`)."""
  a = jnp.asarray(np.random.default_rng(1).standard_normal((size, size)), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, a))
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best / 1e9


def floor_flops(k, n, b=BLOCKSIZE):
  """The docstring's count: three K³/3 factorizations, N K (B + 1) in-block and N K (K - B) lazy-update flops."""
  return k**3 + n * k * (b + 1) + n * k * (k - b)


def timed(fn):
  """(fn's result, seconds)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def sampled(fn):
  """(fn's result, seconds, peak RSS above start in MiB), with the RSS sampler running (it slows fn a little)."""
  with PeakRSS() as mem:
    out, t = timed(fn)
  return out, t, mem.delta_mb


def load_baseline(rev):
  """`gptq_core` as of git revision `rev`: its gptq_core.py and hessian.py, extracted with `git show` into a
  temporary folder and imported from there (the revision must have both files)."""
  root = pathlib.Path(__file__).resolve().parent.parent
  tmp = pathlib.Path(tempfile.mkdtemp())
  for name in ("gptq_core", "hessian"):
    src = subprocess.run(["git", "show", f"{rev}:lowbit_jax/algorithms/{name}.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    (tmp / f"baseline_{name}.py").write_text(src.replace("from lowbit_jax.algorithms.hessian import",
                                                          "from baseline_hessian import"))
  sys.path.insert(0, str(tmp))
  import baseline_gptq_core
  return baseline_gptq_core.gptq_core


def run_layer(k, n, tokens, repeats, with_numpy, baseline=None):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
  x = rng.standard_normal((tokens, k)).astype(np.float32)
  h = x.T @ x / tokens
  spec = lb.int_spec(4, group_size=128)
  wj, hj = jax.block_until_ready((jnp.asarray(w), jnp.asarray(h)))    # on the device, as in the GPTQ pass
  call = lambda: gptq_core(wj, hj, spec, blocksize=BLOCKSIZE).q.codes
  _, t_first, m_first = sampled(call)
  m_jax = sampled(call)[2]                        # before anything else can leave the allocator grown
  old = None if baseline is None else (lambda: baseline(wj, hj, spec, blocksize=BLOCKSIZE).q.codes)
  if old is not None:
    timed(old)                                    # compile
  t_jax = t_old = np.inf
  for _ in range(repeats):                        # interleaved with the baseline's, if any
    t_jax = min(t_jax, timed(call)[1])
    if old is not None:
      t_old = min(t_old, timed(old)[1])
  res = gptq_core(wj, hj, spec, blocksize=BLOCKSIZE)
  row = dict(k=k, n=n, t_first=t_first, m_first=m_first, t_jax=t_jax, m_jax=m_jax, t_np=None, m_np=None,
             t_old=None if old is None else t_old)
  deq = np.asarray(res.q.dequantize())
  err = lambda d: float(np.linalg.norm(x[:256] @ (w - d)))
  row["err"] = dict(jax=err(deq), rtn=err(np.asarray(lb.quantize(w, spec).dequantize())))
  if with_numpy:
    port = lambda: gptq_numpy.gptq_numpy(w, h, bits=4, group_size=128, blocksize=BLOCKSIZE)
    ref, row["t_np"] = timed(port)
    row["m_np"] = sampled(port)[2]
    row["err"]["numpy"] = err(ref)
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=4096)
  ap.add_argument("--n", default="4096,11008", help="comma-separated output widths")
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy port (runs twice: time, then memory)")
  ap.add_argument("--numpy-n", default=None, help="comma-separated N to run the NumPy port on (default: all)")
  ap.add_argument("--baseline", default=None, help="git revision whose gptq_core to time against (compiled)")
  args = ap.parse_args()
  baseline = None if args.baseline is None else load_baseline(args.baseline)
  ns = [int(v) for v in args.n.split(",")]
  numpy_ns = set(ns if args.numpy_n is None else (int(v) for v in args.numpy_n.split(",")))
  rate = matmul_rate()
  rows = [run_layer(args.k, n, args.tokens, args.repeats, not args.no_numpy and n in numpy_ns, baseline)
          for n in ns]
  rate = max(rate, matmul_rate())                 # again after the runs: the better of the two
  print(f"GPTQ int4 g128, blocksize {BLOCKSIZE}, Hessian from {args.tokens} tokens, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; float32 matmul rate {rate:.0f} GFLOP/s")
  print("| layer (K x N) | JAX first call (s) | JAX compiled (s) | peak RSS first / compiled (MiB) | NumPy port (s) "
        "| NumPy peak RSS (MiB) | NumPy / JAX | floor GFLOP | floor (s) | JAX / floor |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    fl = floor_flops(r["k"], r["n"]) / 1e9
    t_floor = fl / rate
    np_cols = ("-", "-", "-") if r["t_np"] is None else (f"{r['t_np']:.2f}", f"{r['m_np']:.0f}",
                                                         f"{r['t_np'] / r['t_jax']:.1f}x")
    print(f"| {r['k']} x {r['n']} | {r['t_first']:.2f} | {r['t_jax']:.2f} | {r['m_first']:.0f} / {r['m_jax']:.0f} "
          f"| {' | '.join(np_cols)} | {fl:.0f} | {t_floor:.2f} | {r['t_jax'] / t_floor:.2f}x |")
  print()
  for r in rows:
    if r["t_old"] is not None:
      print(f"{r['k']} x {r['n']}: gptq_core at {args.baseline} {r['t_old']:.2f} s compiled, ours "
            f"{r['t_jax']:.2f} s: {r['t_jax'] / r['t_old']:.2f}x its time")
  for r in rows:
    errs = ", ".join(f"{name} {v:.4f}" for name, v in r["err"].items())
    print(f"output error on 256 tokens, {r['k']} x {r['n']}: {errs}")


if __name__ == "__main__":
  main()
