"""Streamed GPTQ against whole-model GPTQ on stories260K and the real SmolLM2-135M (GitHub issue 15, item 1), with
the reference's objective and the asymmetric one (GPTAQ).

    python experiments/streamed_gptq.py                     # both models (~35 min on 2 cores)
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
  * streamed: `lb.streamed(lb.gptq, ...)`: one block at a time on quantized inputs (the reference's order);
  * streamed, asymmetric: `lb.streamed(lb.gptq, ..., objective=lb.Objective.ASYMMETRIC)`: each block is fit to
    the float model's outputs from its quantized inputs (GPTAQ's objective).

stories260K is also run at calibration seeds 1 and 2 (other calibration windows; whole model and both streamed
rows). Reported: perplexity and KL to the float model per set (mean over evaluated tokens), wall time of
calibration + quantization (the first run of each row includes its compilation; the persistent compilation cache
in .jax_cache/experiments is on), and the statistics held at once: the bytes of every array of the
`Calibration`(s) the method receives (whole model: one calibration of all weights; streamed: the largest of its
per-block calibrations, measured by wrapping the method; the asymmetric objective's include the cross statistic).
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
                                 "(see the float row); read the comparison on TinyStories and in KL to float.",
         svq.Model.SMOLLM2: ""}


class Mode(enum.Enum):
  FLOAT = "float (unquantized)"
  WHOLE = "whole model"
  SEQUENTIAL = "whole model, true-sequential"
  STREAMED = "streamed"
  ASYMMETRIC = "streamed, asymmetric"


SEEDS = {svq.Model.STORIES260K: (0, 1, 2), svq.Model.SMOLLM2: (0,)}   # calibration seeds (the first: the main table)


@dataclasses.dataclass(frozen=True)
class Result:
  model: str
  spec: str
  mode: Mode
  seed: int
  ppl: tuple                 # per evaluation set
  kl: tuple                  # per evaluation set
  seconds: float
  stats_mib: float


def stats_bytes(calib: lb.Calibration) -> int:
  """Bytes of every statistic array a Calibration holds."""
  return sum(a.nbytes for p in calib for a in jax.tree.leaves(calib[p].stats))


def quantize(mode: Mode, apply, params, batches, spec):
  """-> (qparams, largest statistics held at once in bytes)."""
  if mode in (Mode.STREAMED, Mode.ASYMMETRIC):
    peak = [0]

    def gptq(p, calib, s):
      peak[0] = max(peak[0], stats_bytes(calib))
      return lb.gptq(p, calib, s)
    objective = lb.Objective.ASYMMETRIC if mode is Mode.ASYMMETRIC else lb.Objective.SYMMETRIC
    return lb.streamed(gptq, apply, params, batches, spec, objective=objective), peak[0]
  calib = lb.calibrate(apply, params, batches)
  return lb.gptq(params, calib, spec, true_sequential=mode is Mode.SEQUENTIAL), stats_bytes(calib)


def evaluate_all(cfg: pt.Config, apply, params, sets: list, label: str) -> tuple[tuple, tuple]:
  """(ppl per set, KL to the float model per set): each set evaluated as the one compared to fp32."""
  ppl, kl = [], []
  for ds, data, refs in sets:
    one = dataclasses.replace(cfg, eval_sets=(dataclasses.replace(ds, compare_to_fp32=True),))
    p, k, _ = pt.evaluate(one, apply, params, [data], refs, label)
    ppl.append(p[0])
    kl.append(k)
  return tuple(ppl), tuple(kl)


def run(model: svq.Model, quick: bool) -> tuple[list[Result], pt.Config]:
  exp = svq.EXPERIMENTS[model]
  cfg = exp.quick if quick else exp.cfg
  setup = pt.load(cfg)
  sets = []
  for ds in cfg.eval_sets:
    data = pt.eval_windows(cfg, ds, setup.tokenizer)
    refs = [pt._ref_logits(setup.apply, setup.params, jnp.asarray(data[0][i:i + cfg.batch_size]))
            for i in range(0, data[0].shape[0], cfg.batch_size)]
    sets.append((ds, data, refs))
  name, spec = SPECS[model]
  qapply = lb.quantized(setup.apply)
  ppl, kl = evaluate_all(cfg, setup.apply, setup.params, sets, "float")
  out = [Result(exp.name, name, Mode.FLOAT, SEEDS[model][0], ppl, kl, 0.0, 0.0)]
  for seed in SEEDS[model][:1] if quick else SEEDS[model]:
    batches = pt.calibration_batches(dataclasses.replace(cfg, calib_seed=seed), setup.tokenizer)
    modes = [Mode.WHOLE, Mode.STREAMED, Mode.ASYMMETRIC]
    modes += [Mode.SEQUENTIAL] if model is svq.Model.STORIES260K and seed == SEEDS[model][0] else []
    for mode in tqdm(modes, desc=f"{exp.name} seed {seed}"):
      t0 = time.perf_counter()
      tree, held = quantize(mode, setup.apply, setup.params, batches, spec)
      seconds = time.perf_counter() - t0
      ppl, kl = evaluate_all(cfg, qapply, tree, sets, f"{mode.value}")
      out.append(Result(exp.name, name, mode, seed, ppl, kl, seconds, held / 2**20))
      tqdm.write(f"{exp.name} seed {seed} {mode.value}: ppl {ppl} KL {kl} {seconds:.1f} s stats "
                 f"{held / 2**20:.1f} MiB")
  return out, cfg


def markdown(results, cfgs, quick: bool, minutes: float) -> str:
  lines = ["# Streamed vs whole-model GPTQ", "",
           f"Written by `experiments/streamed_gptq.py{' --quick' if quick else ''}` on "
           f"{datetime.date.today().isoformat()}, jax {jax.__version__} on {jax.default_backend()} (2 cores), "
           f"{minutes:.1f} min. GPTQ act-order with static groups in every row; the protocol is at the end.", ""]
  for model, rows in results.items():
    names = [ds.name for ds in cfgs[model].eval_sets]
    first = [r for r in rows if r.seed == rows[0].seed]
    lines += [f"## {rows[0].model}, {rows[0].spec}", ""] + table(first, names, seeds=False)
    whole = next(r for r in first if r.mode is Mode.WHOLE)
    stream = next(r for r in first if r.mode is Mode.STREAMED)
    closest = [min((r for r in first if r.mode is not Mode.FLOAT), key=lambda r: r.kl[i]).mode.value
               for i in range(len(names))]
    lines += ["", f"Streamed vs whole-model perplexity: {verdicts(names, stream, whole)}. Statistics held: "
              f"{stream.stats_mib:.2f} MiB vs {whole.stats_mib:.2f} MiB ({whole.stats_mib / stream.stats_mib:.1f}x "
              f"less). Closest to the float model (lowest KL): "
              f"{', '.join(f'{n}: {c}' for n, c in zip(names, closest))}. {NOTES[model]}", ""]
    if len({r.seed for r in rows}) > 1:
      means = [mean_row(rows, mode) for mode in (Mode.WHOLE, Mode.STREAMED, Mode.ASYMMETRIC)]
      lines += [f"### {rows[0].model}: calibration seeds {', '.join(str(s) for s in SEEDS[model])}", ""]
      lines += table([r for r in rows if r.mode not in (Mode.SEQUENTIAL, Mode.FLOAT)] + means, names, seeds=True)
      lines += ["", f"Means over seeds, streamed vs whole model: {verdicts(names, means[1], means[0])}; asymmetric "
                f"vs whole model: {verdicts(names, means[2], means[0])}.", ""]
  lines += ["## Protocol (the script's docstring)", "", "E" + __doc__.split("Protocol: e", 1)[1].rstrip(), ""]
  return "\n".join(lines)


def table(rows, names, *, seeds: bool) -> list[str]:
  head = (["seed"] if seeds else []) + ["mode"] + [f"ppl {n}" for n in names] + [f"KL to float {n}" for n in names]
  head += [] if seeds else ["calibrate + quantize (s)", "statistics held at once (MiB)"]
  out = ["| " + " | ".join(head) + " |", "| --- |" + " --- |" * seeds + " ---: |" * (len(head) - 1 - seeds)]
  for r in rows:
    cells = ([str(r.seed)] if seeds else []) + [r.mode.value] + [f"{p:.4f}" for p in r.ppl]
    cost = ["-", "-"] if r.mode is Mode.FLOAT else [f"{r.seconds:.1f}", f"{r.stats_mib:.2f}"]
    cells += [f"{k:.5f}" for k in r.kl] + ([] if seeds else cost)
    out.append("| " + " | ".join(cells) + " |")
  return out


def mean_row(rows, mode: Mode) -> Result:
  """The mean over calibration seeds of one mode's rows (seed "mean")."""
  rs = [r for r in rows if r.mode is mode]
  avg = lambda f: tuple(float(np.mean(v)) for v in zip(*(f(r) for r in rs)))
  return dataclasses.replace(rs[0], seed="mean", ppl=avg(lambda r: r.ppl), kl=avg(lambda r: r.kl),
                             seconds=float(np.mean([r.seconds for r in rs])))


def verdicts(names, a: Result, b: Result) -> str:
  return ", ".join(f"{n}: {x:.4f} {'<=' if x <= y else '>'} {y:.4f}" for n, x, y in zip(names, a.ppl, b.ppl))


def plot(results, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
  for ax, (model, rows) in zip(np.atleast_1d(axes), results.items()):
    for i, r in enumerate(r for r in rows if r.seed == rows[0].seed and r.mode is not Mode.FLOAT):
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
