"""Calibration throughput (tokens/s) and peak memory on the real stories260K Llama (GGUF) over TinyStories.

    python benchmarks/calibration.py [--batches 16] [--batch 8] [--seq 256]

Frozen protocol: the reference Llama (`lowbit_jax.models.llama`) with the GGUF weights, in both layouts (unrolled
`layers_i` and `nn.scan` over stacked layers); TinyStories validation text tokenized once and cut into
non-overlapping (batch, seq) windows; one warm-up batch (compilation) is timed separately. Reported per layout:
  * forward tokens/s of the plain jitted apply (the ceiling),
  * calibration tokens/s with all statistics (Hessian, absmax, mean |x|, outliers) and with absmax only,
  * the ratio calibration / forward, measured in the same run,
  * the wall time of one `calibrate()` call over all batches (compilation, tracing and NaN checks included),
  * peak host RSS (ru_maxrss) and, where the backend reports it, peak device bytes in use.
Steady-state rates run the same jitted step `calibrate` uses, after a warm-up batch.
"""
from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import assets
from lowbit_jax import passes as P
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models import llama
from lowbit_jax.passes import capture
from lowbit_jax.select import select


def _tokens(tokenizer, n: int) -> np.ndarray:
  text = assets.asset_path("tinystories/tinystories_val_part1.txt").read_text(encoding="utf-8")
  ids: list[int] = []
  for block in text.split("\n\n"):
    ids += tokenizer.encode(block.strip(), bos=True)
    if len(ids) >= n:
      break
  if len(ids) < n:
    raise ValueError(f"benchmark: the text yields {len(ids)} tokens, need {n}")
  return np.asarray(ids[:n], np.int32)


def _peak_device_bytes() -> str:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return "n/a (backend reports none)" if peak is None else f"{peak / 2**20:.1f} MiB"


def _time(fn, batches) -> float:
  jax.block_until_ready(fn(batches[0]))             # warm-up / compile
  t = time.perf_counter()
  for b in batches[1:]:
    out = fn(b)
  jax.block_until_ready(out)
  return time.perf_counter() - t


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", type=int, default=16)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  args = ap.parse_args()
  loaded = load_gguf(assets.asset_path("stories260K_gguf/stories260K.gguf"))
  cfg = loaded.config
  ids = _tokens(loaded.tokenizer, args.batches * args.batch * args.seq)
  batches = [jnp.asarray(b) for b in ids.reshape(args.batches, args.batch, args.seq)]
  timed_tokens = (args.batches - 1) * args.batch * args.seq
  print(f"stories260K: dim={cfg.dim} layers={cfg.n_layers} vocab={cfg.vocab_size}; {args.batches} batches of "
        f"{args.batch}x{args.seq} tokens on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
        f"throughput over the {args.batches - 1} batches after the first")
  print(f"{'layout':<10} {'forward tok/s':>14} {'calib all tok/s':>16} {'ratio':>6} {'calib absmax tok/s':>19} "
        f"{'ratio':>6} {'calibrate() wall s':>22}")
  for scan in (False, True):
    model = llama.Llama(cfg, scan_layers=scan)
    params = jax.tree.map(jnp.asarray, loaded.params)
    if scan:
      params = llama.stack_layers(params, cfg.n_layers)
    apply = lambda p, t: model.apply({"params": p}, t)
    fwd = jax.jit(apply)
    t_fwd = _time(lambda b: fwd(params, b), batches)
    tagged = frozenset(select(params))
    rates = []
    for stats in (P.ALL_STATS, {P.Stat.ABSMAX}):
      step = jax.jit(lambda p, b, stats=frozenset(stats): P.collect(apply, p, b, tagged=tagged, stats=stats)[1])
      merge = jax.jit(capture.merge)
      total = None

      def one(b):
        nonlocal total
        em = step(params, b)
        jax.device_get({k: s.nonfinite for k, s in em.items()})      # calibrate's per-batch NaN check
        total = em if total is None else merge(total, em)
        return total
      rates.append(timed_tokens / _time(one, batches))
    t0 = time.perf_counter()
    cal = P.calibrate(apply, params, batches)
    wall = time.perf_counter() - t0
    r_fwd = timed_tokens / t_fwd
    r_all, r_abs = rates
    print(f"{'scan' if scan else 'unrolled':<10} {r_fwd:>14,.0f} {r_all:>16,.0f} {r_all / r_fwd:>6.2f} "
          f"{r_abs:>19,.0f} {r_abs / r_fwd:>6.2f} {wall:>22.2f}   ({len(cal)} weights)")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak host RSS: {rss:.1f} MiB; peak device memory: {_peak_device_bytes()}")


if __name__ == "__main__":
  main()
