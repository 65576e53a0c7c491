"""Sparsity against quantization at matched bytes per weight (GitHub issue 14, item 3): dense low-bit (int8, int4,
int3, NF4), 50 % and 2:4 sparse float16, and the two combined, on stories260K and SmolLM2-135M-Instruct.

    python experiments/sparsity_vs_quant.py --model stories260k        # ~8 min on 2 cores
    python experiments/sparsity_vs_quant.py --model smollm2            # SmolLM2-135M: see its results file
    python experiments/sparsity_vs_quant.py --model smollm2 --quick    # a smoke test of every row, short windows

Writes experiments/results/sparsity_vs_quant_<model>.md and .png after every row (a stopped run leaves its finished
rows); --quick writes sparsity_vs_quant_<model>_quick.md / .png to the system temp directory (or --out-dir), never
over the results.

Protocol:
  * Data: stories260K as experiments/ptq_table.py's CONFIG (calibration 128 x 256 TinyStories training tokens;
    the first 64 windows of 512 tokens of TinyStories val and of WikiText-2 test); SmolLM2-135M-Instruct (its Q4_1
    GGUF dequantized to float32) as experiments/smollm2_table.py's CONFIG (calibration 32 x 512 WikiText-2
    validation tokens), evaluated on the first 8 windows of 512 tokens of each set. One calibration of the unpruned
    model serves every row; KL(unpruned || row) and top-1 agreement on the TinyStories windows.
  * Rows: pruning (magnitude, or SparseGPT: blocksize 128, 1 % dampening, every Hessian from the one dense
    calibration), 50 % unstructured per layer or 2:4 along the contraction axis, then the kept weights stored as
    float16 (cast after pruning), GPTQ (dense rows; act-order, static groups), RTN, or by SparseGPT's joint
    quantization (one pass, the paper's Section 3.5). Integer specs symmetric on the default grid, float32 scales;
    int4 / int3 in groups of 32 on stories260K (K = 64 and 172 share no group size above 4; 172 is padded to 192)
    and of 128 on SmolLM2 (576 padded to 640); NF4 in blocks of 64 with double-quantized scales.
  * Bits per weight over the linear weights, from what is stored (`lowbit_jax.memory_report`): arrays and QArrays
    (codes with padding, scales); 2:4 rows as `compress_24` Sparse24 (kept float16 values or kept codes with their
    scales, plus 2-bit positions: 9 b/w at float16). 50 % unstructured rows are stored dense (the *stored* column)
    and are plotted and ranked at a formula (†) for a bitmap format that is NOT implemented: stored bits minus the
    zero entries' values plus a 1-bit mask per weight (float16: 0.5 x 16 + 1 = 9 b/w).
  * Evaluation runs the float view of the stored tree (`lb.dequantize`, Sparse24 densified, cast to float32). The
    rows marked `verify` also run packed through `lb.quantized(apply)` on one evaluation batch: the largest |logit
    difference| to the float view, or why it runs dequantized (its DequantizedWarning).
  * Time: wall seconds to prune, quantize and compress a row, jit compilations included; calibration once.
  * Which wins: per budget, the row of lowest perplexity plotted at or below it, beside each family's best there.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lowbit_jax as lb
from lowbit_jax import select as sel
from lowbit_jax.passes import DequantizedWarning
from lowbit_jax.spec import QuantSpec

try:
  from experiments import ptq_table as pt
  from experiments import smollm2_table as st
except ModuleNotFoundError:  # run as `python experiments/sparsity_vs_quant.py`
  import ptq_table as pt
  import smollm2_table as st

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ((9.25, "about 9"), (6.0, "5-6"), (4.5, "3-4.5"))   # (upper limit in bits/weight, name)
HALF = lb.Sparsity(fraction=0.5)
TWO_FOUR = lb.NM(n=2, m=4)


class Model(enum.Enum):
  STORIES260K = "stories260k"
  SMOLLM2 = "smollm2"


class Prune(enum.Enum):
  NONE = ""
  MAGNITUDE = "magnitude"
  SPARSEGPT = "SparseGPT"


class Store(enum.Enum):
  """How the kept weights are stored."""
  FP32 = "fp32"
  FP16 = "fp16"
  GPTQ = "GPTQ"
  RTN = "RTN"
  JOINT = "SparseGPT joint"   # quantized by `lb.sparsegpt(..., spec=)` in its pruning pass


class Family(enum.Enum):
  FLOAT = "float (unpruned)"
  DENSE_QUANT = "dense quant"
  SPARSE_FP16 = "sparse fp16"
  SPARSE_QUANT = "sparse + quant"


@dataclasses.dataclass(frozen=True)
class Row:
  prune: Prune
  pattern: lb.Sparsity | lb.NM | None
  store: Store
  spec: QuantSpec | None = None
  spec_name: str = ""
  verify: bool = False   # also run this row packed by lb.quantized(apply) on one batch

  @property
  def family(self) -> Family:
    if self.prune is Prune.NONE:
      return Family.FLOAT if self.spec is None else Family.DENSE_QUANT
    return Family.SPARSE_FP16 if self.spec is None else Family.SPARSE_QUANT

  @property
  def unstructured(self) -> bool:
    return isinstance(self.pattern, lb.Sparsity)

  @property
  def label(self) -> str:
    if self.spec is None:
      return (f"{self.prune.value} {'50 %' if self.unstructured else '2:4'} fp16" if self.prune is not Prune.NONE
              else "fp32 (unpruned)" if self.store is Store.FP32 else "float16")
    quant = f"{self.spec_name} (joint)" if self.store is Store.JOINT else f"{self.store.value} {self.spec_name}"
    if self.prune is Prune.NONE:
      return quant
    return f"{self.prune.value} {'50 %' if self.unstructured else '2:4'} + {quant}"


def rows(group: int) -> tuple[Row, ...]:
  int8, int4, int3 = lb.int_spec(8), lb.int_spec(4, group_size=group), lb.int_spec(3, group_size=group)
  g8, g4, g3 = "int8 per-channel", f"int4 g{group}", f"int3 g{group}"
  n = Prune.NONE
  m, sg = Prune.MAGNITUDE, Prune.SPARSEGPT
  return (Row(n, None, Store.FP32), Row(n, None, Store.FP16),
          Row(n, None, Store.GPTQ, int8, g8), Row(n, None, Store.GPTQ, int4, g4, verify=True),
          Row(n, None, Store.GPTQ, int3, g3), Row(n, None, Store.RTN, lb.nf4_spec(), "NF4 (DQ)"),
          Row(m, HALF, Store.FP16), Row(sg, HALF, Store.FP16),
          Row(m, TWO_FOUR, Store.FP16), Row(sg, TWO_FOUR, Store.FP16, verify=True),
          Row(sg, TWO_FOUR, Store.JOINT, int8, g8), Row(sg, TWO_FOUR, Store.JOINT, int4, g4, verify=True),
          Row(m, TWO_FOUR, Store.RTN, int4, g4), Row(sg, HALF, Store.JOINT, int4, g4))


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: Model
  name: str
  cfg: pt.Config
  quick: pt.Config   # --quick: short calibration and evaluation windows
  group: int         # group size of the int4 / int3 rows
  note: str          # how to read this model's table


_SMOL = dataclasses.replace(st.CONFIG, seq_len=512, batch_size=4, max_windows=8)
EXPERIMENTS = {e.model: e for e in (
    Experiment(Model.STORIES260K, "stories260K", pt.CONFIG, dataclasses.replace(
        pt.CONFIG, calib_windows=8, calib_len=128, calib_batch=4, max_windows=2, seq_len=128, batch_size=2), 32,
        "stories260K was trained on TinyStories only: WikiText-2 is far out of its domain (perplexity ~140), where "
        "a lossy row can score below the unpruned model; read rankings on TinyStories."),
    Experiment(Model.SMOLLM2, "SmolLM2-135M-Instruct (Q4_1 dequantized)", _SMOL, dataclasses.replace(
        _SMOL, calib_windows=4, calib_len=256, calib_batch=2, max_windows=1, seq_len=256, batch_size=1), 128,
        "The unpruned model is the Q4_1 GGUF dequantized: its weights already lie on a 4-bit grid (asymmetric, "
        "groups of 32), so 4-bit rows lose less than from a float-trained checkpoint; compare them with each "
        "other."))}


@dataclasses.dataclass
class RunInfo:
  windows: list[int]          # evaluated windows per set
  calib_seconds: float
  minutes: float = 0.0
  done: bool = False
  verify: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (row, `packed_check`)
  skipped: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Result:
  label: str
  family: Family
  formula: bool           # plotted at the bitmap formula (50 % unstructured), not at the stored bytes
  ppl: tuple[float, ...]  # one per evaluation set
  kl: float
  top1: float
  bits_stored: float      # linear weights, stored bytes
  bits_plot: float        # = bits_stored, or the bitmap formula for `formula` rows
  bits_model: float       # whole model, stored bytes
  seconds: float


# pure helpers (tests/test_sparsity_vs_quant.py): bitmap_bits, pareto_front, best_within, checks, winners
def bitmap_bits(stored_bits: float, numel: int, nnz: int, value_bits: int) -> float:
  """Total bits of a weight in a bitmap format: what is stored dense, less the values of its numel - nnz zero
  entries, plus a 1-bit mask per weight (a formula: the library has no such format)."""
  return stored_bits - (numel - nnz) * value_bits + numel


def pareto_front(bits: Sequence[float], ppl: Sequence[float]) -> list[int]:
  """Indices of the points no other point beats (fewer or equal bits and lower perplexity), by increasing bits."""
  order = sorted(range(len(bits)), key=lambda i: (bits[i], ppl[i]))
  front, best = [], math.inf
  for i in order:
    if ppl[i] < best:
      front.append(i)
      best = ppl[i]
  return front


def best_within(results: Sequence[Result], budget: float, i: int, family: Family | None = None) -> Result | None:
  """The row of lowest perplexity on set `i` among those (of `family`) plotted at or below `budget` b/w."""
  ok = [r for r in results if r.bits_plot <= budget and (family is None or r.family is family)]
  return min(ok, key=lambda r: r.ppl[i]) if ok else None


def _leaves(tree) -> dict:
  """{path_str: leaf}, QArrays and Sparse24 as leaves."""
  is_packed = lambda x: isinstance(x, (lb.QArray, lb.Sparse24))  # noqa: E731
  return {sel.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_packed)[0]}


def build(row: Row, params, calib, linear: frozenset[str]):
  """The stored tree of one row: pruned, quantized, and for 2:4 rows compressed (every linear weight a Sparse24)."""
  on_linear = lambda f: lambda p, x: f(x) if sel.path_str(p) in linear else x  # noqa: E731
  tree = params
  if row.prune is Prune.MAGNITUDE:
    tree = lb.magnitude_prune(params, calib, row.pattern)
  elif row.prune is Prune.SPARSEGPT:
    tree = lb.sparsegpt(params, calib, row.pattern, spec=row.spec if row.store is Store.JOINT else None)
  if row.store is Store.FP16:
    tree = jax.tree_util.tree_map_with_path(on_linear(lambda x: x.astype(jnp.float16)), tree)
  elif row.store is Store.GPTQ:
    tree = lb.gptq(tree, calib, row.spec)
  elif row.store is Store.RTN:
    tree = lb.rtn(tree, None, row.spec)
  if isinstance(row.pattern, lb.NM):
    tree = lb.compress_24(tree, where=lambda p, x: p in linear)
  want = lb.Sparse24 if isinstance(row.pattern, lb.NM) else jax.Array if row.spec is None else lb.QArray
  wrong = sorted(p for p, x in _leaves(tree).items() if p in linear and not isinstance(x, want))
  if wrong:
    raise ValueError(f"{row.label}: linear weights not stored as {want.__name__}: {wrong}")
  return tree


def float_view(tree):
  """The float32 view the evaluation runs: packed leaves decoded (`lb.dequantize`), every float leaf float32."""
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      lb.dequantize(tree))


def plot_bits(tree, linear: frozenset[str]) -> float:
  """`bitmap_bits` over the linear weights of a (dense-stored) unstructured row, per weight; value bits: the
  QArray's code bits or the float itemsize."""
  flat, mem = _leaves(tree), {leaf.path: leaf for leaf in lb.memory_report(tree).leaves}
  total = numel = 0
  for p in sorted(linear):
    x = flat[p]
    dense = x.dequantize() if isinstance(x, lb.QArray) else x
    value_bits = x.spec.bits if isinstance(x, lb.QArray) else 8 * np.dtype(x.dtype).itemsize
    total += bitmap_bits(8 * mem[p].nbytes, mem[p].params, int(jnp.count_nonzero(dense)), value_bits)
    numel += mem[p].params
  return total / numel


def packed_check(qapply, apply, tree, view, batch) -> str:
  """`qapply(tree, batch)` (packed) against `apply(view, batch)` (the float view): the max |logit difference|, or
  why it could not run packed (a DequantizedWarning is an error here: a float copy would compare nothing)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", DequantizedWarning)
      packed = qapply(tree, batch)
  except DequantizedWarning as e:
    return f"does not run packed: {str(e).splitlines()[0][:240]}"
  floats = apply(view, batch)
  return (f"max |logit difference| {float(jnp.max(jnp.abs(packed - floats))):.3g} (max |logit| "
          f"{float(jnp.max(jnp.abs(floats))):.3g})")


def run(exp: Experiment, cfg: pt.Config, row_list: Sequence[Row], report=lambda results, info: None):
  """-> (results, info); `report(results, info)` after every row."""
  t_start = time.perf_counter()
  setup = pt.load(cfg)
  data = [pt.eval_windows(cfg, ds, setup.tokenizer) for ds in cfg.eval_sets]
  cmp = next(i for i, ds in enumerate(cfg.eval_sets) if ds.compare_to_fp32)
  refs = [pt._ref_logits(setup.apply, setup.params, jnp.asarray(data[cmp][0][i:i + cfg.batch_size]))
          for i in tqdm(range(0, data[cmp][0].shape[0], cfg.batch_size), desc="reference logits", leave=False)]
  t0 = time.perf_counter()
  calib = lb.calibrate(setup.apply, setup.params, pt.calibration_batches(cfg, setup.tokenizer))
  info = RunInfo([n for _, n in data], time.perf_counter() - t0)
  qapply = jax.jit(lb.quantized(setup.apply))
  check_batch = jnp.asarray(data[cmp][0][:cfg.batch_size])
  results: list[Result] = []
  for row in tqdm(row_list, desc=f"{exp.name} rows"):
    try:
      t0 = time.perf_counter()
      tree = jax.block_until_ready(build(row, setup.params, calib, setup.linear_paths))
      seconds = time.perf_counter() - t0
      view = float_view(tree)
      if row.verify:
        info.verify.append((row.label, packed_check(qapply, setup.apply, tree, view, check_batch)))
      ppl, kl, top1 = pt.evaluate(cfg, setup.apply, view, data, refs, row.label)
      stored, model_bits = pt.bits_per_weight(tree, setup.linear_paths)
      shown = plot_bits(tree, setup.linear_paths) if row.unstructured else stored
      results.append(Result(row.label, row.family, row.unstructured, ppl, kl, top1, stored, shown, model_bits,
                            seconds))
      tqdm.write(f"{row.label:44s} ppl {' / '.join(f'{p:.4f}' for p in ppl)}  KL {kl:.5f}  {stored:.3f} "
                 f"({shown:.3f}) b/w  {seconds:.1f} s")
      del tree, view
    except Exception as e:  # a row that cannot run is reported, never estimated
      info.skipped.append(f"{row.label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
      tqdm.write(f"{row.label}: SKIPPED ({info.skipped[-1]})")
    info.minutes = (time.perf_counter() - t_start) / 60
    report(results, info)
  info.minutes, info.done = (time.perf_counter() - t_start) / 60, True
  report(results, info)
  return results, info


def checks(results: Sequence[Result], names: Sequence[str]) -> list[str]:
  """The acceptance comparisons of the issue as table lines: SparseGPT below magnitude at 50 % and at 2:4."""
  by = {r.label: r for r in results}
  lines = ["| check | " + " | ".join(names) + " |", "|" + " --- |" * (1 + len(names))]
  for sparsity in ("50 %", "2:4"):
    s, m = by.get(f"SparseGPT {sparsity} fp16"), by.get(f"magnitude {sparsity} fp16")
    cells = ["n/a (row missing)"] * len(names) if s is None or m is None else [
        f"{'PASS' if s.ppl[i] < m.ppl[i] else 'FAIL'} ({s.ppl[i]:.4f} vs {m.ppl[i]:.4f})" for i in range(len(names))]
    lines.append(f"| SparseGPT {sparsity} fp16: perplexity below magnitude {sparsity} fp16 | " + " | ".join(cells)
                 + " |")
  return lines


def winners(results: Sequence[Result], names: Sequence[str]) -> list[str]:
  lines = []
  for budget, name in BUDGETS:
    for i, ds in enumerate(names):
      win = best_within(results, budget, i)
      if win is None:
        lines.append(f"* **{name} b/w** (at most {budget:g}), {ds}: no row.")
        continue
      others = [best_within(results, budget, i, f) for f in Family if f is not win.family]
      rest = "; ".join(f"best {r.family.value}: {r.label} {r.ppl[i]:.4f} at {r.bits_plot:.3f}"
                       for r in others if r is not None)
      lines.append(f"* **{name} b/w** (at most {budget:g}), {ds}: **{win.label}** ({win.family.value}), ppl "
                   f"{win.ppl[i]:.4f} at {win.bits_plot:.3f} b/w{'†' if win.formula else ''}"
                   + (f" ({rest})." if rest else "."))
  return lines


def markdown(exp: Experiment, cfg: pt.Config, results: Sequence[Result], info: RunInfo, quick: bool) -> str:
  names = [ds.name for ds in cfg.eval_sets]
  cmp = next(ds.name for ds in cfg.eval_sets if ds.compare_to_fp32)
  state = "" if info.done else st.PARTIAL
  lines = [
      f"# Sparsity vs quantization at matched bytes: {exp.name}", "",
      f"Written by `experiments/sparsity_vs_quant.py --model {exp.model.value}{' --quick' if quick else ''}` on "
      f"{datetime.date.today().isoformat()}, jax {jax.__version__} on {jax.default_backend()}; "
      f"{info.minutes:.1f} min{state}. Evaluation: the first {cfg.max_windows} "
      f"windows of {cfg.seq_len} tokens of each set (" + ", ".join(f"{n}: {w}" for n, w in zip(names, info.windows))
      + f"); KL and top-1 against the unpruned model on {cmp}. Calibration {cfg.calib_windows} x {cfg.calib_len} "
      f"tokens, {info.calib_seconds:.1f} s, once. int4 / int3 groups of {exp.group}. {exp.note} The protocol is "
      "at the end.",
      "", "Sorted by the plotted bits per weight. † : 50 % unstructured rows are stored dense by the library "
      "(*stored* column); they are plotted and ranked at a bitmap formula (values of the nonzeros + 1 bit per "
      "weight; not an implemented format).", "",
      "| row | family | " + " | ".join(f"ppl {n}" for n in names) + " | KL to unpruned | top-1 | b/w stored (linear) "
      "| b/w plotted | b/w (model) | prune + quant time (s) |",
      "| --- | --- |" + " ---: |" * (len(names) + 6)]
  for r in sorted(results, key=lambda r: (r.bits_plot, r.label)):
    lines.append(f"| {r.label} | {r.family.value} | " + " | ".join(f"{p:.4f}" for p in r.ppl) +
                 f" | {r.kl:.5f} | {100 * r.top1:.2f} % | {r.bits_stored:.3f} | {r.bits_plot:.3f}"
                 f"{' †' if r.formula else ''} | {r.bits_model:.3f} | {r.seconds:.1f} |")
  if info.skipped:
    lines += ["", "Rows that could not run (no number is estimated):", ""] + [f"* {s}" for s in info.skipped]
  lines += ["", "## Checks", ""] + checks(results, names)
  lines += ["", "Packed execution: `lb.quantized(apply)` on the stored tree against the float view the table "
            f"evaluates, one batch ({cfg.batch_size} x {cfg.seq_len} tokens of {cmp}):", ""]
  lines += [f"* {label}: {what}" for label, what in info.verify]
  lines += ["", "## Which wins at each memory budget", "",
            "The lowest-perplexity row plotted at or below each budget (linear weights; the other families' best "
            "in brackets):", ""] + winners(results, names)
  lines += ["", "## Protocol (the script's docstring)", "", __doc__.split("Protocol:\n", 1)[1].rstrip(), ""]
  return "\n".join(lines)


MARKERS = {Family.FLOAT: "o", Family.DENSE_QUANT: "s", Family.SPARSE_FP16: "^", Family.SPARSE_QUANT: "D"}


def plot(exp: Experiment, cfg: pt.Config, results: Sequence[Result], path: Path) -> None:
  """Perplexity (log) vs plotted bits per weight (log2), one panel per evaluation set, the Pareto front drawn."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(cfg.eval_sets), figsize=(6.5 * len(cfg.eval_sets), 4.8))
  for i, ax in enumerate(np.atleast_1d(axes)):
    for fam, marker in MARKERS.items():
      for formula in (False, True):
        pts = [r for r in results if r.family is fam and r.formula == formula]
        if pts:
          ax.scatter([r.bits_plot for r in pts], [r.ppl[i] for r in pts], marker=marker, s=45, alpha=0.85,
                     color=f"C{list(MARKERS).index(fam)}", facecolors="none" if formula else None,
                     label=fam.value + (" (bitmap formula †)" if formula else ""))
    for r in results:
      ax.annotate(r.label, (r.bits_plot, r.ppl[i]), fontsize=5, xytext=(3, 2), textcoords="offset points")
    front = [results[j] for j in pareto_front([r.bits_plot for r in results], [r.ppl[i] for r in results])]
    ax.step([r.bits_plot for r in front], [r.ppl[i] for r in front], where="post", color="k", lw=0.8, alpha=0.6,
            label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="bits per weight (linear weights: stored bytes; † bitmap formula)",
           ylabel="perplexity (log)", title=cfg.eval_sets[i].name)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.suptitle(f"{exp.name}: sparsity vs quantization")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(model: Model = Model.STORIES260K, quick: bool = False, out_dir: Path | None = None,
         row_list: Sequence[Row] | None = None) -> tuple[list[Result], RunInfo]:
  exp = EXPERIMENTS[model]
  cfg = exp.quick if quick else exp.cfg
  out_dir = out_dir or (Path(tempfile.gettempdir()) if quick else RESULTS)
  out_dir.mkdir(parents=True, exist_ok=True)
  out = out_dir / f"sparsity_vs_quant_{model.value}{'_quick' if quick else ''}"

  def report(results, info):
    out.with_suffix(".md").write_text(markdown(exp, cfg, results, info, quick), encoding="utf-8")
    if results:
      plot(exp, cfg, results, out.with_suffix(".png"))

  results, info = run(exp, cfg, rows(exp.group) if row_list is None else row_list, report)
  print(out.with_suffix(".md").read_text(encoding="utf-8"))
  print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
  return results, info


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", type=Model, choices=list(Model), default=Model.STORIES260K)
  ap.add_argument("--quick", action="store_true", help="a smoke test of every row on short windows (temp dir)")
  ap.add_argument("--out-dir", type=Path, default=None, help="default: experiments/results (--quick: temp dir)")
  args = ap.parse_args()
  main(args.model, args.quick, args.out_dir)
