"""Mixed precision on stories260K: `lowbit_jax.allocate` against uniform formats of equal or larger bytes, with RTN
and GPTQ, and how well each sensitivity measure predicts what quantizing a unit costs.

    python -m experiments.allocate_table          # ~20 min on 2 cores
    python -m experiments.allocate_table --full   # every evaluation window

Writes experiments/results/allocate_table.md.

Protocol:
  * Model, calibration (128 random TinyStories training windows of 256 tokens, seed 0), evaluation windows, ppl,
    KL and top-1 to fp32: exactly experiments/ptq_table.py's (its helpers are imported), except that the layers
    run unrolled (`Llama(scan_layers=False)`): a scanned stack is one leaf with one format, unrolled the model has
    20 units (per layer: q/k/v, o, gate/up, down; the classifier is tied to the float embedding).
  * Candidates: `CANDIDATES`, symmetric (`SymGrid.FULL`), float32 scales. Budgets: the bits/weight of each of
    `UNIFORM_AT` as stored (codes with padding, scales), so every mixed row stores at most the bytes of its uniform
    row.
  * One `allocate(..., sensitivity=KL_WEIGHTED)` call measures everything (RTN errors, output energies and the KL
    factors from 2 calibration batches); the other measures reuse it (`Allocation.with_budget`). Each allocation
    is quantized with `Allocation.apply(lb.rtn | lb.gptq, ...)` (GPTQ: blocksize 128, 1 % dampening, no
    act-order) and evaluated on its packed weights through `jax.jit(lowbit_jax.quantized(apply))`.
  * Sensitivity check: for every unit and candidate, the unit alone is quantized round-to-nearest and the KL to
    fp32 is measured on the first `probe_windows` TinyStories val windows; the table gives the Spearman rank
    correlation of each measure's prediction with it (over all unit x candidate pairs) and the median
    |log(predicted / measured)| of the KL-weighted prediction.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lowbit_jax as lb
from lowbit_jax import select as sel
from lowbit_jax.algorithms.common import replace_leaves
from lowbit_jax.allocate import DEFAULT_SENSITIVITY, Allocation, Sensitivity, spec_label
from lowbit_jax.allocate_core import mean_kl

try:
  import experiments.ptq_table as ptq
except ModuleNotFoundError:  # run as `python experiments/allocate_table.py`
  import ptq_table as ptq


class Method(enum.Enum):
  RTN = "RTN"
  GPTQ = "GPTQ"


# The FULL grid, pinned: the committed table was measured before the default grid became SIGNED_MAX (issue 10).
_int = functools.partial(lb.int_spec, grid=lb.SymGrid.FULL)
CANDIDATES = (_int(2, group_size=32), _int(3), _int(3, group_size=64), _int(3, group_size=32), _int(4),
              _int(4, group_size=64), _int(4, group_size=32), _int(8))
UNIFORM_AT = (_int(3, group_size=64), _int(3, group_size=32), _int(4, group_size=64))
MEASURES = (Sensitivity.ABSOLUTE, Sensitivity.RELATIVE, Sensitivity.KL_WEIGHTED)
DEFAULT = DEFAULT_SENSITIVITY.value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  ptq: ptq.Config
  candidates: tuple = CANDIDATES
  uniform_at: tuple = UNIFORM_AT
  methods: tuple = (Method.RTN, Method.GPTQ)
  probe_windows: int = 32
  out: Path = Path(__file__).resolve().parent / "results" / "allocate_table.md"


CONFIG = Config(ptq=dataclasses.replace(ptq.CONFIG, scan_layers=False, rows=()))


@dataclasses.dataclass(frozen=True)
class Row:
  budget: str           # the uniform spec whose bytes are the budget
  method: Method
  allocation: str       # "uniform" or a Sensitivity value
  ppl: tuple[float, ...]
  kl: float
  top1: float
  bits: float           # memory_report, the allocated weights
  predicted_kl: float   # Σ of the KL-weighted unit errors of the chosen formats


def probe(cfg: Config, setup, calib, alloc: Allocation) -> np.ndarray:
  """(U, C) KL to fp32 with only unit u round-to-nearest with candidate c, on the probe windows."""
  ds = next(d for d in cfg.ptq.eval_sets if d.compare_to_fp32)
  windows, n = ptq.eval_windows(dataclasses.replace(cfg.ptq, max_windows=cfg.probe_windows), ds, setup.tokenizer)
  tokens = jnp.asarray(windows[:n])
  kl_of = jax.jit(lambda p, ref: mean_kl(ref, setup.apply(p, tokens)))
  ref = jax.jit(setup.apply)(setup.params, tokens)
  leaves = dict(jax.tree_util.tree_flatten_with_path(setup.params)[0])
  out = np.zeros((len(alloc.units), len(alloc.candidates)))
  for (i, u), (j, c) in tqdm([(a, b) for a in enumerate(alloc.units) for b in enumerate(alloc.candidates)],
                             desc="probe", leave=False):
    done = {p: calib[p].layout.quantize(leaves[p], c).dequantize() for p in u.paths}
    out[i, j] = float(kl_of(replace_leaves(setup.params, done), ref))
  return out


def spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(np.ravel(a))), np.argsort(np.argsort(np.ravel(b)))
  return float(np.corrcoef(ra, rb)[0, 1])


def run(cfg: Config):
  t_start = time.perf_counter()
  setup = ptq.load(cfg.ptq)
  data = [ptq.eval_windows(cfg.ptq, ds, setup.tokenizer) for ds in cfg.ptq.eval_sets]
  cmp = next(i for i, ds in enumerate(cfg.ptq.eval_sets) if ds.compare_to_fp32)
  refs = [ptq._ref_logits(setup.apply, setup.params, jnp.asarray(data[cmp][0][i:i + cfg.ptq.batch_size]))
          for i in range(0, data[cmp][0].shape[0], cfg.ptq.batch_size)]
  calib = lb.calibrate(setup.apply, setup.params, ptq.calibration_batches(cfg.ptq, setup.tokenizer))
  t0 = time.perf_counter()
  base = lb.allocate(setup.params, calib, 32.0, cfg.candidates, sensitivity=Sensitivity.KL_WEIGHTED)
  info = {"allocate_seconds": time.perf_counter() - t0}
  measured = probe(cfg, setup, calib, base)
  n = base.n_weights
  kl_err = np.asarray([u.errors(Sensitivity.KL_WEIGHTED) for u in base.units])
  rows, allocs = [], {}
  fp32 = ptq.evaluate(cfg.ptq, setup.apply, setup.params, data, refs, "fp32")
  qapply = lb.quantized(setup.apply)
  for spec in cfg.uniform_at:
    c = cfg.candidates.index(spec)
    uniform = dataclasses.replace(base, choice=(c,) * len(base.units))
    budget = uniform.bits_per_weight
    choices = {"uniform": uniform} | {m.value: base.with_budget(budget, sensitivity=m) for m in MEASURES}
    allocs[spec_label(spec)] = choices
    for method in cfg.methods:
      transform = {Method.RTN: lb.rtn, Method.GPTQ: lb.gptq}[method]
      for name, a in choices.items():
        tree = a.apply(transform, setup.params, calib,
                       options=dict(act_order=False, static_groups=False) if method is Method.GPTQ else None)
        ppl, kl, top1 = ptq.evaluate(cfg.ptq, qapply, tree, data, refs, f"{method.value} {name}")
        rep = {l.path: l for l in lb.memory_report(tree).leaves}
        chosen = [rep[sel.path_str(p)] for p in a.specs]
        bits = 8.0 * sum(l.nbytes for l in chosen) / sum(l.params for l in chosen)
        assert sum(l.params for l in chosen) == n and bits <= budget, (bits, budget)
        pred = float(sum(kl_err[i, k] for i, k in enumerate(a.choice)))
        rows.append(Row(spec_label(spec), method, name, ppl, kl, top1, bits, pred))
        tqdm.write(f"{spec_label(spec):10s} {method.value:4s} {name:12s} ppl {' / '.join(f'{p:.4f}' for p in ppl)}"
                   f"  KL {kl:.5f} (predicted {pred:.5f})  {bits:.3f} b/w")
  info["total_seconds"] = time.perf_counter() - t_start
  return fp32, rows, allocs, base, measured, info


def markdown(cfg: Config, fp32, rows, allocs, base: Allocation, measured, info, full: bool) -> str:
  names = [ds.name for ds in cfg.ptq.eval_sets]
  pred = {m: np.asarray([u.errors(m) for u in base.units]) for m in MEASURES}
  log_gap = np.median(np.abs(np.log(pred[Sensitivity.KL_WEIGHTED] / measured)))
  cap = "all windows (--full)" if full else f"the first {cfg.ptq.max_windows} windows of {cfg.ptq.seq_len} tokens"
  lines = [
      "# Mixed precision on stories260K (lowbit_jax.allocate)", "",
      f"Written by `experiments/allocate_table.py` on {datetime.date.today().isoformat()}, jax {jax.__version__} "
      f"on {jax.devices()[0].platform}; whole run {info['total_seconds'] / 60:.1f} min; the sensitivities of all "
      f"{len(base.units)} units x {len(base.candidates)} candidates (RTN errors, KL factors) took "
      f"{info['allocate_seconds']:.1f} s. Evaluation: {cap} of each set.", "",
      "## Which sensitivity predicts the cost of quantizing a unit", "",
      f"KL to fp32 with one unit round-to-nearest ({len(base.units)} units x {len(base.candidates)} candidates, "
      f"the first {cfg.probe_windows} TinyStories val windows):", "",
      "| measure | Spearman rank correlation with the measured KL |", "| --- | ---: |"]
  lines += [f"| {m.value} | {spearman(pred[m], measured):.3f} |" for m in MEASURES]
  lines += ["", f"KL-weighted predictions are within a median factor of {math.exp(log_gap):.3f} of the measured "
            f"KL (median |log(predicted / measured)| = {log_gap:.3f}).", "",
            "## Perplexity at equal bytes", "",
            "Budget: the bits/weight of the uniform format (its stored bytes); bits/weight: `memory_report` of the "
            "result over the allocated weights; predicted KL: Σ of the KL-weighted unit errors (additive model).",
            "", "| budget (uniform) | method | allocation | " + " | ".join(f"ppl {n}" for n in names) +
            " | KL to fp32 | predicted KL | top-1 vs fp32 | bits/weight |",
            "| --- | --- | --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: | ---: |",
            "| - | fp32 | - | " + " | ".join(f"{p:.4f}" for p in fp32[0]) + " | 0 | 0 | 100.00 % | 32.000 |"]
  for r in rows:
    lines.append(f"| {r.budget} | {r.method.value} | {r.allocation} | " + " | ".join(f"{p:.4f}" for p in r.ppl) +
                 f" | {r.kl:.5f} | {r.predicted_kl:.5f} | {100 * r.top1:.2f} % | {r.bits:.3f} |")
  lines += ["", "## Checks", "", "| check | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names)
            + " |"]
  by = {(r.budget, r.method, r.allocation): r for r in rows}
  for budget, method, m in sorted({(r.budget, r.method.value, r.allocation) for r in rows if r.allocation !=
                                   "uniform"}, key=lambda k: (k[2] != DEFAULT, k)):
    mixed, uni = by[(budget, Method(method), m)], by[(budget, Method(method), "uniform")]
    cells = [f"{'PASS' if a < b else 'MISS'} ({a:.4f} vs {b:.4f})" for a, b in zip(mixed.ppl, uni.ppl)]
    lines.append(f"| {method} {m} at {budget}'s bytes: ppl below uniform {budget} | " + " | ".join(cells) + " |")
  lines += ["", "## Allocations", "", "Chosen format per unit (columns: budget / measure).", "",
            "| unit | " + " | ".join(f"{b} / {m}" for b, ch in allocs.items() for m in ch if m != "uniform") + " |",
            "| --- | " + " | ".join("---" for ch in allocs.values() for m in ch if m != "uniform") + " |"]
  for i, u in enumerate(base.units):
    cells = [spec_label(a.candidates[a.choice[i]]) for ch in allocs.values() for m, a in ch.items()
             if m != "uniform"]
    lines.append(f"| {u.name} | " + " | ".join(cells) + " |")
  protocol = __doc__.split("Protocol:\n", 1)[1].rstrip()
  lines += ["", "## Protocol (the script's docstring)", "", protocol, "",
            "Candidates: " + ", ".join(spec_label(c) for c in cfg.candidates) + ".", ""]
  return "\n".join(lines)


def main(cfg: Config = CONFIG, full: bool = False):
  if full:
    cfg = dataclasses.replace(cfg, ptq=dataclasses.replace(cfg.ptq, max_windows=None))
  fp32, rows, allocs, base, measured, info = run(cfg)
  text = markdown(cfg, fp32, rows, allocs, base, measured, info, full)
  cfg.out.parent.mkdir(parents=True, exist_ok=True)
  cfg.out.write_text(text, encoding="utf-8")
  print(text)
  return rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true", help="evaluate every window of both sets")
  main(full=parser.parse_args().full)
