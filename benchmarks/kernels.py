"""Benchmark of the quantized matmul kernels against XLA's bf16 dot of the dequantized weight.

    python benchmarks/kernels.py            # CPU: reference and interpret-mode kernels on small shapes,
                                            # writes benchmarks/RESULTS.md (the GPU/TPU table stays pending)
    python benchmarks/kernels.py --full     # on an H100/H200 (or TPU): M in {1,4,16,64,256,4096},
                                            # K = N in {4096, 8192} and Llama-7B's 4096 x 11008, compiled kernels;
                                            # prints the table (add --write to put it into RESULTS.md)

Per row: the median wall time of `--iters` jitted calls (after a warm-up), the ratio versus XLA's bf16 dot of the
dequantized weight measured in the same run (> 1: faster than bf16), achieved GB/s (weight bytes as stored, plus
activations and output) and TFLOP/s (2 M K N). Rows of one (op, format, shape) share the same inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lowbit_jax as lb  # noqa: E402
from lowbit_jax import kernels  # noqa: E402
from lowbit_jax.kernels import Backend, Platform  # noqa: E402
from lowbit_jax.spec import Format  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

# (label, op, spec)
FORMATS = [
    ("W4A16 int4 g128", "qmatmul", lb.int_spec(4, group_size=128)),
    ("W4A16 int4 g128 asym", "qmatmul", lb.int_spec(4, group_size=128, symmetric=False)),
    ("W8A16 int8 per-channel", "qmatmul", lb.int_spec(8)),
    ("NF4 g64 double-quant", "qmatmul", lb.nf4_spec()),
    ("ternary per-tensor", "qmatmul", lb.ternary_spec()),
    ("W8A8 int8 per-token", "w8a8", lb.int_spec(8)),
    ("FP8 E4M3 x E4M3", "w8a8", lb.fp8_spec(Format.FP8_E4M3, per_channel=True)),
]
FULL_M = (1, 4, 16, 64, 256, 4096)
FULL_KN = ((4096, 4096), (8192, 8192), (4096, 11008))
CPU_M = (1, 16, 64)
CPU_KN = ((512, 512),)


@dataclasses.dataclass(frozen=True)
class Row:
  fmt: str
  m: int
  k: int
  n: int
  impl: str
  ms: float
  vs_bf16: float
  gbps: float
  tflops: float


def median_ms(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))          # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def implementations(op: str, platform: Platform | None, interpret: bool):
  """(name, fn(x, w)) pairs to time besides the bf16 baseline."""
  call = kernels.qmatmul if op == "qmatmul" else kernels.w8a8_matmul
  out = [("reference", jax.jit(functools.partial(call, backend=Backend.REFERENCE)))]
  families = [platform] if platform is not None else ([Platform.TPU, Platform.GPU] if interpret else [])
  for fam in families:
    out.append((f"pallas-{fam.value}" + ("-interpret" if interpret else ""),
                jax.jit(functools.partial(call, backend=Backend.AUTO, platform=fam, interpret=interpret))))
  return out


def bench_one(label, op, spec, m, k, n, *, platform, interpret, iters) -> list[Row]:
  kw, kx = jax.random.split(jax.random.PRNGKey(m * 7 + k + n))
  w = jax.jit(functools.partial(lb.quantize, spec=spec))(jax.random.normal(kw, (k, n), jnp.float32) * 0.02)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w_bf16 = jax.block_until_ready(w.dequantize().astype(jnp.bfloat16))
  io_bytes = 2 * m * k + 2 * m * n
  flops = 2.0 * m * k * n
  base = median_ms(jax.jit(jnp.dot), x, w_bf16, iters=iters)
  rows = [Row(label, m, k, n, "xla-bf16-dot", base, 1.0, (2 * k * n + io_bytes) / base / 1e6, flops / base / 1e9)]
  for name, fn in implementations(op, platform, interpret):
    ms = median_ms(fn, x, w, iters=iters)
    d = kernels.last_decision()
    if name.startswith("pallas") and d.backend is not Backend.PALLAS:
      name += f" (fell back: {d.reason})"
    rows.append(Row(label, m, k, n, name, ms, base / ms, (w.nbytes + io_bytes) / ms / 1e6, flops / ms / 1e9))
  return rows


def table(rows: list[Row]) -> str:
  head = ("| format | M | K | N | implementation | median ms | vs bf16 dot | GB/s | TFLOP/s |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|")
  body = [f"| {r.fmt} | {r.m} | {r.k} | {r.n} | {r.impl} | {r.ms:.3f} | {r.vs_bf16:.2f}x | {r.gbps:.1f} | "
          f"{r.tflops:.3f} |" for r in rows]
  return "\n".join([head] + body)


def environment() -> str:
  dev = jax.devices()[0]
  return (f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
          f"{os.cpu_count()} host CPUs, {datetime.date.today().isoformat()}")


DEVICE_HEADER = "## GPU / TPU table"
PENDING = DEVICE_HEADER + """

**Pending.** No H100/H200 (or TPU) was available to this session, so no device numbers exist; none are guessed
here. To fill this section, on a machine with the accelerator run once:

    python benchmarks/kernels.py --full --write

(M in {1, 4, 16, 64, 256, 4096}; K = N in {4096, 8192}; Llama-7B's 4096 x 11008; compiled Pallas kernels against
XLA's bf16 dot of the dequantized weight, measured in the same run.) For reference, Marlin reports about 3.87x over
fp16 for 4-bit weights at batch <= 16; the ideal for our int4 g128 with f32 scales is 16 / 4.25 = 3.76x.
"""


def write_cpu_results(rows: list[Row], env: str) -> None:
  """Rewrite RESULTS.md with the CPU table, keeping a device section that is already there."""
  device = PENDING
  if os.path.exists(RESULTS):
    text = open(RESULTS).read()
    if DEVICE_HEADER in text and "**Pending.**" not in text.split(DEVICE_HEADER, 1)[1]:
      device = DEVICE_HEADER + text.split(DEVICE_HEADER, 1)[1]
  parts = ["# Kernel benchmark results", "",
           "Produced by `benchmarks/kernels.py`; ratios are versus XLA's bf16 dot of the dequantized weight in the "
           "same run (> 1 is faster). GB/s counts the weight bytes as stored plus activations and output.", "",
           "## CPU (reference and interpret mode; small shapes)", "", f"Environment: {env}.", "",
           "Interpret mode runs the kernel body as ordinary XLA ops; its times measure the interpreter, not the "
           "kernel, and only show that the harness runs end to end. Not a performance claim.", "",
           table(rows), "", device]
  with open(RESULTS, "w") as f:
    f.write("\n".join(parts))


def write_device_results(rows: list[Row], env: str) -> None:
  """Replace the device section of RESULTS.md (the pending note) with the measured table."""
  text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Kernel benchmark results\n\n"
  head = text.split(DEVICE_HEADER, 1)[0]
  with open(RESULTS, "w") as f:
    f.write(head + DEVICE_HEADER + f"\n\nEnvironment: {env}.\n\n" + table(rows) + "\n")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--full", action="store_true", help="full shapes, compiled kernels (needs a GPU or TPU)")
  ap.add_argument("--write", action="store_true", help="with --full: write the device table into RESULTS.md")
  ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 50 device, 20 CPU)")
  ap.add_argument("--formats", default=None, help="comma-separated substrings selecting format labels")
  args = ap.parse_args(argv)
  platform = kernels.common.detect_platform()
  if args.full and platform is None:
    sys.exit("--full needs a GPU or TPU (jax.default_backend() is %r)" % jax.default_backend())
  interpret = platform is None
  m_list, kn_list = (FULL_M, FULL_KN) if args.full else (CPU_M, CPU_KN)
  iters = args.iters or (50 if platform else 20)
  chosen = [f for f in FORMATS if not args.formats or any(s in f[0] for s in args.formats.split(","))]
  env = environment()
  print(env)
  rows: list[Row] = []
  for label, op, spec in chosen:
    for k, n in kn_list:
      for m in m_list:
        new = bench_one(label, op, spec, m, k, n, platform=platform, interpret=interpret, iters=iters)
        rows += new
        for r in new:
          print(f"{r.fmt:26s} M={r.m:5d} K={r.k:5d} N={r.n:5d} {r.impl:28s} {r.ms:9.3f} ms "
                f"{r.vs_bf16:6.2f}x {r.gbps:8.1f} GB/s {r.tflops:7.3f} TFLOP/s", flush=True)
  print()
  print(table(rows))
  if not args.full:
    write_cpu_results(rows, env)
  elif args.write:
    write_device_results(rows, env)


if __name__ == "__main__":
  main()
