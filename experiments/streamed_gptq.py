"""Streamed GPTQ against whole-model GPTQ on stories260K and the real SmolLM2-135M (GitHub issue 15, item 1).

    python experiments/streamed_gptq.py                     # both models (~25 min on 2 cores)
    python experiments/streamed_gptq.py --model stories260k
    python experiments/streamed_gptq.py --quick             # short windows, a temp dir (a smoke test)

Writes experiments/results/streamed_gptq.md and .png.

Protocol: each model's calibration windows, evaluation windows and KL reference are those of
experiments/sparsity_vs_quant.py (stories260K: 128 x 256 TinyStories-train tokens, 64 windows of 512 per set;
SmolLM2: 32 x 512 WikiText-2 validation tokens, 8 windows of 512 per set), layers scanned. Rows, all GPTQ with
act-order and static groups (the library's default) on the same spec per model:

  * whole model: `lb.calibrate` once (every weight's statistics at the same time), then `lb.gptq`;
  * whole model, true-sequential (stories260K only: it re-runs the whole model after each group of weights,
    quadratic in depth): `lb.gptq(..., true_sequential=True)`;
  * streamed: `lb.streamed(lb.gptq, ...)`: one block at a time on quantized inputs (the reference's order).

Reported: perplexity per set, KL to the float model, wall time of calibration + quantization (the first run of
each row includes its compilation; the persistent compilation cache in .jax_cache/experiments is on), and the
statistics held at once: the bytes of every array of the `Calibration`(s) the method receives (whole model: one
calibration of all weights; streamed: the largest of its per-block calibrations, measured by wrapping the method).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lowbit_jax as lb

try:
  from experiments import compile_cache, ptq_table as pt, sparsity_vs_quant as svq
except ModuleNotFoundError:  # run as `python experiments/streamed_gptq.py`
  import compile_cache
  import ptq_table as pt
  import sparsity_vs_quant as svq

RESULTS = Path(__file__).resolve().parent / "results"
SPECS = {svq.Model.STORIES260K: ("int4 g32", lb.int_spec(4, group_size=32)),
         svq.Model.SMOLLM2: ("int3 g128", lb.int_spec(3, group_size=128))}


NOTES = {svq.Model.STORIES260K: "stories260K was trained on TinyStories only: WikiText-2 is far out of its domain "
                                 "(float perplexity ~140); read the comparison on TinyStories.",
         svq.Model.SMOLLM2: ""}


class Mode(enum.Enum):
  WHOLE = "whole model"
  SEQUENTIAL = "whole model, true-sequential"
  STREAMED = "streamed"


@dataclasses.dataclass(frozen=True)
class Result:
  model: str
  spec: str
  mode: Mode
  ppl: tuple
  kl: float
  seconds: float
  stats_mib: float


def stats_bytes(calib: lb.Calibration) -> int:
  """Bytes of every statistic array a Calibration holds."""
  return sum(a.nbytes for p in calib for a in jax.tree.leaves(calib[p].stats))


def quantize(mode: Mode, apply, params, batches, spec):
  """-> (qparams, largest statistics held at once in bytes)."""
  if mode is Mode.STREAMED:
    peak = [0]

    def gptq(p, calib, s):
      peak[0] = max(peak[0], stats_bytes(calib))
      return lb.gptq(p, calib, s)
    return lb.streamed(gptq, apply, params, batches, spec), peak[0]
  calib = lb.calibrate(apply, params, batches)
  return lb.gptq(params, calib, spec, true_sequential=mode is Mode.SEQUENTIAL), stats_bytes(calib)


def run(model: svq.Model, quick: bool) -> tuple[list[Result], pt.Config]:
  exp = svq.EXPERIMENTS[model]
  cfg = exp.quick if quick else exp.cfg
  setup = pt.load(cfg)
  data = [pt.eval_windows(cfg, ds, setup.tokenizer) for ds in cfg.eval_sets]
  cmp = next(i for i, ds in enumerate(cfg.eval_sets) if ds.compare_to_fp32)
  refs = [pt._ref_logits(setup.apply, setup.params, jnp.asarray(data[cmp][0][i:i + cfg.batch_size]))
          for i in range(0, data[cmp][0].shape[0], cfg.batch_size)]
  batches = pt.calibration_batches(cfg, setup.tokenizer)
  name, spec = SPECS[model]
  modes = [Mode.WHOLE, Mode.STREAMED] + ([Mode.SEQUENTIAL] if model is svq.Model.STORIES260K else [])
  qapply = lb.quantized(setup.apply)
  out = []
  for mode in tqdm(modes, desc=exp.name):
    t0 = time.perf_counter()
    tree, held = quantize(mode, setup.apply, setup.params, batches, spec)
    seconds = time.perf_counter() - t0
    ppl, kl, _ = pt.evaluate(cfg, qapply, tree, data, refs, f"{mode.value}")
    out.append(Result(exp.name, name, mode, ppl, kl, seconds, held / 2**20))
    tqdm.write(f"{exp.name} {mode.value}: ppl {ppl} KL {kl:.5f} {seconds:.1f} s stats {held / 2**20:.1f} MiB")
  return out, cfg


def markdown(results, cfgs, quick: bool, minutes: float) -> str:
  lines = ["# Streamed vs whole-model GPTQ", "",
           f"Written by `experiments/streamed_gptq.py{' --quick' if quick else ''}` on "
           f"{datetime.date.today().isoformat()}, jax {jax.__version__} on {jax.default_backend()} (2 cores), "
           f"{minutes:.1f} min. GPTQ act-order with static groups in every row; the protocol is at the end.", ""]
  for model, rows in results.items():
    cfg = cfgs[model]
    names = [ds.name for ds in cfg.eval_sets]
    lines += [f"## {rows[0].model}, {rows[0].spec}", "",
              "| mode | " + " | ".join(f"ppl {n}" for n in names) + " | KL to float | calibrate + quantize (s) | "
              "statistics held at once (MiB) |", "| --- |" + " ---: |" * (len(names) + 3)]
    for r in rows:
      lines.append(f"| {r.mode.value} | " + " | ".join(f"{p:.4f}" for p in r.ppl) +
                   f" | {r.kl:.5f} | {r.seconds:.1f} | {r.stats_mib:.2f} |")
    whole = next(r for r in rows if r.mode is Mode.WHOLE)
    stream = next(r for r in rows if r.mode is Mode.STREAMED)
    verdicts = ", ".join(f"{n}: {s:.4f} {'<=' if s <= w else '>'} {w:.4f}"
                         for n, s, w in zip(names, stream.ppl, whole.ppl))
    lines += ["", f"Streamed vs whole-model perplexity: {verdicts}. Statistics held: {stream.stats_mib:.2f} MiB vs "
              f"{whole.stats_mib:.2f} MiB ({whole.stats_mib / stream.stats_mib:.1f}x less). {NOTES[model]}", ""]
  lines += ["## Protocol (the script's docstring)", "", "E" + __doc__.split("Protocol: e", 1)[1].rstrip(), ""]
  return "\n".join(lines)


def plot(results, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
  for ax, (model, rows) in zip(np.atleast_1d(axes), results.items()):
    for i, r in enumerate(rows):
      ax.scatter([r.stats_mib], [r.ppl[0]], s=60, color=f"C{i}", label=r.mode.value)
    ax.set_xscale("log")
    ax.set_xlabel("statistics held at once (MiB, log)")
    ax.set_ylabel("perplexity (first evaluation set)")
    ax.set_title(f"{rows[0].model}, GPTQ {rows[0].spec}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(models, quick: bool = False) -> dict:
  t0 = time.perf_counter()
  results, cfgs = {}, {}
  out_dir = Path(tempfile.gettempdir()) if quick else RESULTS
  for model in models:
    results[model], cfgs[model] = run(model, quick)
  md, png = out_dir / "streamed_gptq.md", out_dir / "streamed_gptq.png"
  md.write_text(markdown(results, cfgs, quick, (time.perf_counter() - t0) / 60), encoding="utf-8")
  plot(results, png)
  print(md.read_text(encoding="utf-8"))
  print(f"wrote {md} and {png}")
  return results


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", type=svq.Model, choices=list(svq.Model), default=None, help="default: both")
  ap.add_argument("--quick", action="store_true", help="short windows, written to a temp dir")
  args = ap.parse_args()
  compile_cache.enable()
  main([args.model] if args.model else list(svq.Model), args.quick)
