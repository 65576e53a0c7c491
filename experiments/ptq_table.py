"""Post-training quantization of stories260K: every method of the library on one table (GitHub issue 5, item 5).

    python -m experiments.ptq_table                       # a newcomer's run: QUICK rows, 8 windows, ~3 min
    python -m experiments.ptq_table --full                # the committed table (every row, 64 windows), ~10 min
    python -m experiments.ptq_table --full --all-windows  # every window of both evaluation sets

Writes experiments/results/ptq_table.md (table, config, acceptance checks) and ptq_table.png; the quick run writes
ptq_table_quick.md / .png instead, so it never overwrites the committed table. Compiled programs are cached on disk
in .jax_cache/experiments (JAX's persistent compilation cache), so a rerun skips most compilation.

Protocol:
  * Calibration (GPTQ, AWQ, SmoothQuant, LLM.int8()): the TinyStories training slice is tokenized like the headline
    evaluation (BOS_PER_BLOCK, see experiments/fp32_perplexity.py); `calib_windows` start offsets are drawn
    uniformly (with replacement) from [0, N - calib_len] by `np.random.default_rng(calib_seed)`, sorted, and the
    windows tokens[s : s + calib_len] are fed to `lowbit_jax.calibrate` in batches of `calib_batch`. One
    calibration of the fp32 model serves every calibrated row; its time is reported once, not per row.
  * Evaluation: each set is cut into non-overlapping windows of `seq_len` tokens (as `lowbit_jax.eval.perplexity`),
    of which the first `max_windows` are run (all with --all-windows); in every window tokens 1..seq_len-1 are scored.
    KL(fp32 || quantized) and top-1 agreement with fp32 are averaged over the same scored positions of the
    TinyStories windows, against fp32 logits computed once.
  * Every quantized row runs the packed parameters (QArray leaves; asserted for every linear weight) through
    `jax.jit(lowbit_jax.quantized(apply))`: no dequantized copy of the model is ever evaluated.
  * bits/weight: bytes actually stored (`lowbit_jax.memory_report`: codes with padding, scales, zero points,
    in_scale, double-quantized scales) x 8 / number of weights, over the linear weights only and over the whole
    model (the fp32 token embedding, shared with the tied classifier, and the norm scales stay fp32).
  * quant time: wall time of the quantization call (including its jit compilation), excluding calibration.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import functools
import math
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lowbit_jax as lb
from lowbit_jax import select as sel
from lowbit_jax.algorithms.llm_int8 import llm_int8_spec
from lowbit_jax.assets import asset_path
from lowbit_jax import eval as ev
from lowbit_jax.eval import Segmentation, token_kl_divergence
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama, stack_layers

try:
  from experiments import compile_cache
except ModuleNotFoundError:  # run as `python experiments/ptq_table.py`
  import compile_cache



class Method(enum.Enum):
  FP32 = "fp32"
  RTN = "RTN"
  GPTQ = "GPTQ"
  AWQ = "AWQ"
  SMOOTHQUANT = "SmoothQuant W8A8"
  LLM_INT8 = "LLM.int8()"
  NF4 = "NF4 (+DQ)"
  FP8 = "FP8 E4M3"

  @property
  def calibrated(self) -> bool:
    return self in (Method.GPTQ, Method.AWQ, Method.SMOOTHQUANT, Method.LLM_INT8)


@dataclasses.dataclass(frozen=True)
class Row:
  method: Method
  bits: int | None = None
  group_size: int | None = None  # None: per output channel
  act_order: bool = False        # GPTQ only; with groups it implies static_groups=True

  @property
  def label(self) -> str:
    if self.bits is None:
      return self.method.value
    gran = "per-channel" if self.group_size is None else f"g{self.group_size}"
    return f"{self.method.value} w{self.bits} {gran}" + (" act-order" if self.act_order else "")


@dataclasses.dataclass(frozen=True)
class EvalSet:
  name: str
  asset: str
  segmentation: Segmentation
  compare_to_fp32: bool  # KL divergence and top-1 agreement are computed on this set


@dataclasses.dataclass(frozen=True)
class Config:
  model: str
  scan_layers: bool
  calib_asset: str
  calib_windows: int
  calib_len: int
  calib_seed: int
  calib_batch: int
  eval_sets: tuple[EvalSet, ...]
  seq_len: int
  batch_size: int
  max_windows: int | None  # first windows of each evaluation set; None: all of them
  smoothquant_alpha: float
  llm_int8_threshold: float
  rows: tuple[Row, ...]
  out_dir: Path
  calib_segmentation: Segmentation = Segmentation.BOS_PER_BLOCK
  out_name: str = "ptq_table"   # <out_dir>/<out_name>.md and .png


def _rows() -> tuple[Row, ...]:
  rows = [Row(Method.FP32)]
  rows += [Row(Method.RTN, b, g) for b in (8, 4, 3) for g in (None, 32, 64)]
  rows += [Row(Method.GPTQ, b, g, ao) for b in (4, 3) for g in (32, 64) for ao in (False, True)]
  rows += [Row(Method.AWQ, b, g) for b in (4, 3) for g in (32, 64)]
  rows += [Row(Method.SMOOTHQUANT), Row(Method.LLM_INT8), Row(Method.NF4), Row(Method.FP8)]
  return tuple(rows)


# ---- frozen config ------------------------------------------------------------------------------------------------
CONFIG = Config(
    model="stories260K_gguf/stories260K.gguf",
    scan_layers=True,
    calib_asset="tinystories/tinystories_train_first2MiB.txt",
    calib_windows=128, calib_len=256, calib_seed=0, calib_batch=8,
    eval_sets=(
        EvalSet("TinyStories val (part 1)", "tinystories/tinystories_val_part1.txt", Segmentation.BOS_PER_BLOCK,
                True),
        EvalSet("WikiText-2 test", "wikitext2_raw/wiki.test.raw", Segmentation.ONE_DOCUMENT, False),
    ),
    seq_len=512, batch_size=8, max_windows=64,
    smoothquant_alpha=0.5, llm_int8_threshold=6.0,
    rows=_rows(),
    out_dir=Path(__file__).resolve().parent / "results",
)
# The default run: the methods a newcomer compares first, on fewer evaluation windows (compilation,
# not arithmetic, dominates this model's run time; every row compiles its quantizer and its packed forward).
QUICK = dataclasses.replace(
    CONFIG, max_windows=8, out_name="ptq_table_quick",
    rows=(Row(Method.FP32), Row(Method.RTN, 4, 32), Row(Method.GPTQ, 4, 32, True), Row(Method.AWQ, 4, 32),
          Row(Method.NF4)))
# -------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
  row: Row
  ppl: tuple[float, ...]  # one per evaluation set
  kl: float               # mean KL(fp32 || row), nats per scored token
  top1: float             # fraction of scored tokens where the argmax matches fp32
  bits_linear: float
  bits_model: float
  quant_seconds: float


@dataclasses.dataclass(frozen=True)
class Setup:
  apply: Callable[[Any, jax.Array], jax.Array]
  params: Any
  tokenizer: Any
  linear_paths: frozenset[str]


def load(cfg: Config) -> Setup:
  loaded = load_gguf(asset_path(cfg.model))
  model = Llama(loaded.config, scan_layers=cfg.scan_layers)
  floats = lb.dequantize(loaded.params)  # the float view: a GGUF's Q4_1 / Q8_0 QArrays decoded (as gguf-py does)
  params = stack_layers(floats, loaded.config.n_layers) if cfg.scan_layers else floats

  def apply(p, tokens):
    return model.apply({"params": p}, tokens)

  linear = frozenset(sel.path_str(p) for p in sel.select(params))
  return Setup(apply, jax.device_put(params), loaded.tokenizer, linear)


@functools.lru_cache(maxsize=None)
def token_stream(asset: str, segmentation: Segmentation, tokenizer) -> np.ndarray:
  """The whole file tokenized as in experiments/fp32_perplexity.py, (N,) int32, read-only (cached: WikiText-2 takes
  seconds)."""
  stream = ev.token_stream(asset_path(asset).read_text(encoding="utf-8"), tokenizer, segmentation)
  stream.setflags(write=False)
  return stream


def calibration_batches(cfg: Config, tokenizer) -> list[jax.Array]:
  """`calib_windows` random windows of the training slice (see the module docstring), (calib_batch, len) each."""
  stream = token_stream(cfg.calib_asset, cfg.calib_segmentation, tokenizer)
  return ev.sample_windows(stream, n=cfg.calib_windows, length=cfg.calib_len, batch=cfg.calib_batch,
                           seed=cfg.calib_seed)


def eval_windows(cfg: Config, ds: EvalSet, tokenizer) -> tuple[np.ndarray, int]:
  """The evaluated windows padded to whole batches, (n_batches * batch_size, seq_len), and the real count."""
  stream = token_stream(ds.asset, ds.segmentation, tokenizer)
  n = stream.shape[0] // cfg.seq_len
  if cfg.max_windows is not None:
    n = min(n, cfg.max_windows)
  windows = stream[:n * cfg.seq_len].reshape(n, cfg.seq_len)
  pad = -n % cfg.batch_size
  return np.concatenate([windows, np.zeros((pad, cfg.seq_len), np.int32)]), n


@functools.partial(jax.jit, static_argnums=0)
def _batch_metrics(apply_fn: Callable, params, batch: jax.Array, weight: jax.Array, ref_logits: jax.Array | None):
  """batch (B, S) int32, weight (B,) 1/0 for real/padding windows, ref_logits (B, S-1, V) or None -> the sums over
  real windows of: nll of the scored tokens, KL(ref || model) and argmax agreement (the last two 0 without ref)."""
  logits = apply_fn(params, batch)[:, :-1].astype(jnp.float32)  # (B, S-1, V): position t predicts token t+1
  target = batch[:, 1:]
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  nll = jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weight[:, None])
  if ref_logits is None:
    return nll, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  kl = jnp.sum(token_kl_divergence(ref_logits, logits) * weight[:, None])
  agree = (jnp.argmax(ref_logits, axis=-1) == jnp.argmax(logits, axis=-1)).astype(jnp.float32)
  return nll, kl, jnp.sum(agree * weight[:, None])


@functools.partial(jax.jit, static_argnums=0)
def _ref_logits(apply_fn: Callable, params, batch: jax.Array) -> jax.Array:
  return apply_fn(params, batch)[:, :-1].astype(jnp.float32)


def evaluate(cfg: Config, apply_fn: Callable, params, data, refs: list[jax.Array], label: str):
  """-> (ppl per set, mean KL, top-1 agreement) over `data` = [(windows, n_real)] per evaluation set."""
  ppls, kl, top1 = [], math.nan, math.nan
  for ds, (windows, n) in zip(cfg.eval_sets, data):
    weights = (np.arange(windows.shape[0]) < n).astype(np.float32)
    sums = np.zeros(3)
    for i in tqdm(range(windows.shape[0] // cfg.batch_size), desc=f"{label} | {ds.name}", leave=False):
      sl = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
      ref = refs[i] if ds.compare_to_fp32 else None
      out = _batch_metrics(apply_fn, params, jnp.asarray(windows[sl]), jnp.asarray(weights[sl]), ref)
      sums += np.asarray([float(v) for v in out], np.float64)
    scored = n * (cfg.seq_len - 1)
    ppls.append(math.exp(sums[0] / scored))
    if ds.compare_to_fp32:
      kl, top1 = sums[1] / scored, sums[2] / scored
  return tuple(ppls), kl, top1


def quantize_row(cfg: Config, row: Row, params, calib) -> Any:
  """The packed parameters of one row (QArray leaves for the linear weights)."""
  m = row.method
  if m is Method.RTN:
    return lb.rtn(params, None, lb.int_spec(row.bits, group_size=row.group_size))
  if m is Method.GPTQ:
    return lb.gptq(params, calib, lb.int_spec(row.bits, group_size=row.group_size), act_order=row.act_order,
                   static_groups=row.act_order and row.group_size is not None)
  if m is Method.AWQ:
    return lb.awq(params, calib, lb.int_spec(row.bits, group_size=row.group_size))
  if m is Method.SMOOTHQUANT:
    return lb.smoothquant(params, calib, alpha=cfg.smoothquant_alpha)
  if m is Method.LLM_INT8:
    return lb.llm_int8(params, calib, llm_int8_spec(threshold=cfg.llm_int8_threshold))
  if m is Method.NF4:
    return lb.rtn(params, None, lb.nf4_spec())
  if m is Method.FP8:
    return lb.rtn(params, None, lb.fp8_spec())
  raise ValueError(f"no quantizer for {row}")


def bits_per_weight(tree, linear_paths: frozenset[str]) -> tuple[float, float]:
  """(bits per weight over the linear weights, over the whole model) from `memory_report`."""
  rep = lb.memory_report(tree)
  lin = [leaf for leaf in rep.leaves if leaf.path in linear_paths]
  return 8.0 * sum(l.nbytes for l in lin) / sum(l.params for l in lin), rep.bits_per_weight


def run(cfg: Config) -> tuple[list[Result], dict[Row, str], dict[str, Any]]:
  t_start = time.perf_counter()
  setup = load(cfg)
  data = [eval_windows(cfg, ds, setup.tokenizer) for ds in cfg.eval_sets]
  cmp = next(i for i, ds in enumerate(cfg.eval_sets) if ds.compare_to_fp32)
  ref_windows = data[cmp][0]
  refs = [_ref_logits(setup.apply, setup.params, jnp.asarray(ref_windows[i:i + cfg.batch_size]))
          for i in tqdm(range(0, ref_windows.shape[0], cfg.batch_size), desc="fp32 reference logits", leave=False)]
  info: dict[str, Any] = {"windows": [n for _, n in data], "calib_seconds": None}
  calib = None
  if any(r.method.calibrated for r in cfg.rows):
    batches = calibration_batches(cfg, setup.tokenizer)
    t0 = time.perf_counter()
    calib = lb.calibrate(setup.apply, setup.params, batches, outlier_threshold=cfg.llm_int8_threshold)
    info["calib_seconds"] = time.perf_counter() - t0
  qapply = lb.quantized(setup.apply)
  results: list[Result] = []
  skipped: dict[Row, str] = {}
  for row in tqdm(cfg.rows, desc="rows"):
    try:
      if row.method is Method.FP32:
        tree, seconds, fn = setup.params, 0.0, setup.apply
      else:
        t0 = time.perf_counter()
        tree = jax.block_until_ready(quantize_row(cfg, row, setup.params, calib))
        seconds, fn = time.perf_counter() - t0, qapply
        leaves = {sel.path_str(p): l for p, l in
                  jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, lb.QArray))[0]}
        floats = sorted(p for p in setup.linear_paths if not isinstance(leaves.get(p), lb.QArray))
        if floats:
          raise ValueError(f"linear weights left unquantized (not QArrays): {floats}")
      ppl, kl, top1 = evaluate(cfg, fn, tree, data, refs, row.label)
      bl, bm = bits_per_weight(tree, setup.linear_paths)
      results.append(Result(row, ppl, kl, top1, bl, bm, seconds))
      tqdm.write(f"{row.label:32s} ppl {' / '.join(f'{p:.4f}' for p in ppl)}  KL {kl:.5f}  top1 {top1:.4f}  "
                 f"{bl:.3f} b/w  {seconds:.1f} s")
    except Exception as e:  # a row that cannot run is left out and reported, never estimated
      skipped[row] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
      tqdm.write(f"{row.label}: SKIPPED ({skipped[row]})\n{traceback.format_exc(limit=4)}")
  info["total_seconds"] = time.perf_counter() - t_start
  return results, skipped, info


def acceptance(results: list[Result], n_sets: int) -> list[tuple[str, list[str]]]:
  """[(check, [verdict per evaluation set])] computed from the perplexities; a check whose rows are missing says so."""
  by = {r.row: r for r in results}
  fp32 = by.get(Row(Method.FP32))
  checks: list[tuple[str, list[str]]] = []

  def check(name: str, rows: tuple[Row, ...], verdict: Callable[[int], tuple[bool, str]]) -> None:
    if any(r not in by for r in rows):
      checks.append((name, ["n/a (row missing)"] * n_sets))
    else:
      checks.append((name, [f"{'PASS' if ok else 'MISS'} ({why})" for ok, why in map(verdict, range(n_sets))]))

  gap = lambda row, i: by[row].ppl[i] - fp32.ppl[i]
  for g in (32, 64):
    rtn = Row(Method.RTN, 4, g)
    for gptq in (Row(Method.GPTQ, 4, g), Row(Method.GPTQ, 4, g, True)):
      check(f"{gptq.label}: ppl gap to fp32 <= 0.5 x {rtn.label}'s gap", (Row(Method.FP32), rtn, gptq),
            lambda i, q=gptq, r=rtn: (gap(q, i) <= 0.5 * gap(r, i), f"{gap(q, i):+.4f} vs 0.5 x {gap(r, i):+.4f}"))
  for g in (32, 64):
    rtn, awq = Row(Method.RTN, 4, g), Row(Method.AWQ, 4, g)
    check(f"{awq.label}: ppl below {rtn.label}", (rtn, awq), lambda i, q=awq, r=rtn: (
        by[q].ppl[i] < by[r].ppl[i], f"{by[q].ppl[i]:.4f} vs {by[r].ppl[i]:.4f}"))
  for row in (Row(Method.SMOOTHQUANT), Row(Method.LLM_INT8)):
    rel = lambda i, q=row: by[q].ppl[i] / fp32.ppl[i] - 1
    check(f"{row.label}: ppl within 1 % of fp32", (Row(Method.FP32), row),
          lambda i, rel=rel: (abs(rel(i)) <= 0.01, f"{100 * rel(i):+.3f} %"))
  return checks


def markdown(cfg: Config, results: list[Result], skipped: dict[Row, str], info: dict[str, Any],
             all_windows: bool) -> str:
  names = [ds.name for ds in cfg.eval_sets]
  cmp = next(ds.name for ds in cfg.eval_sets if ds.compare_to_fp32)
  windows = ", ".join(f"{ds.name}: {n} windows" for ds, n in zip(cfg.eval_sets, info["windows"]))
  cap = ("all windows (--all-windows)" if all_windows
         else f"the first {cfg.max_windows} windows of {cfg.seq_len} tokens of each set")
  calib = "none" if info["calib_seconds"] is None else f"{info['calib_seconds']:.1f} s, once"
  lines = [
      "# Post-training quantization of stories260K",
      "",
      f"Written by `experiments/ptq_table.py` on {datetime.date.today().isoformat()}, jax {jax.__version__} on "
      f"{jax.devices()[0].platform}; whole run {info['total_seconds'] / 60:.1f} min.",
      "",
      f"**Evaluation: {cap}** ({windows}; {cfg.seq_len - 1} scored tokens per window; the fp32 numbers of the "
      f"full sets are in fp32_perplexity.md). KL and top-1 are measured on the {cmp} windows. Calibration: "
      f"{calib}. Settings: RTN and GPTQ symmetric; GPTQ blocksize 128, 1 % dampening, no true-sequential "
      f"re-capture, act-order with groups uses static groups; AWQ `awq(params, calib, int_spec(bits, group_size=))` "
      f"(symmetric, clip search, scales folded into the preceding norm where the graph allows, else kept as the QArray in_scale); SmoothQuant alpha {cfg.smoothquant_alpha} (int8 per-channel weights, "
      f"per-token dynamic int8 activations, scales folded like AWQ's); LLM.int8() threshold {cfg.llm_int8_threshold}; NF4 `nf4_spec()` "
      f"(blocks of 64, double-quantized scales); FP8 `fp8_spec()` (E4M3, per-tensor scale). Scales are float32.",
      "",
      "| method | " + " | ".join(f"ppl {n}" for n in names) + " | KL to fp32 | top-1 vs fp32 | bits/weight "
      "(linear) | bits/weight (model) | quant time (s) |",
      "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in results:
    lines.append(f"| {r.row.label} | " + " | ".join(f"{p:.4f}" for p in r.ppl) +
                 f" | {r.kl:.5f} | {100 * r.top1:.2f} % | {r.bits_linear:.3f} | {r.bits_model:.3f} | "
                 f"{r.quant_seconds:.2f} |")
  if skipped:
    lines += ["", "Rows left out (they could not run; no number is estimated):", ""]
    lines += [f"* {row.label}: {why}" for row, why in skipped.items()]
  lines += ["", "## Acceptance checks", "",
            "| check | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
  lines += [f"| {name} | " + " | ".join(v) + " |" for name, v in acceptance(results, len(names))]
  protocol = textwrap.dedent(__doc__.split("Protocol:\n", 1)[1]).rstrip()
  lines += ["", "## Protocol (the script's docstring)", "", protocol]
  lines += ["", "## Config", "", "```", *_config_lines(cfg, all_windows), "```", ""]
  return "\n".join(lines)


def _config_lines(cfg: Config, all_windows: bool) -> list[str]:
  shown = {"rows": ", ".join(r.label for r in cfg.rows),
           "eval_sets": "; ".join(f"{d.name} ({d.asset}, {d.segmentation.name})" for d in cfg.eval_sets)}
  return [f"{f.name} = {shown.get(f.name, getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
          if f.name not in ("out_dir", "out_name")] + [f"all_windows = {all_windows}"]


MARKERS = {Method.RTN: "o", Method.GPTQ: "s", Method.AWQ: "^", Method.SMOOTHQUANT: "D", Method.LLM_INT8: "P",
           Method.NF4: "*", Method.FP8: "X"}


def plot(cfg: Config, results: list[Result], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(cfg.eval_sets), figsize=(6.5 * len(cfg.eval_sets), 4.8))
  for i, (ax, ds) in enumerate(zip(np.atleast_1d(axes), cfg.eval_sets)):
    for r in results:
      if r.row.method is Method.FP32:
        ax.axhline(r.ppl[i], color="k", ls="--", lw=1, label=f"fp32 ({r.ppl[i]:.3f})")
    for m, marker in MARKERS.items():
      pts = [r for r in results if r.row.method is m]
      if pts:
        ax.scatter([r.bits_linear for r in pts], [r.ppl[i] for r in pts], marker=marker, s=45, alpha=0.8,
                   label=m.value)
  finish_ppl_plot(fig, axes, cfg, "stories260K PTQ: perplexity vs bits per weight", path)


def finish_ppl_plot(fig, axes, cfg: Config, title: str, path: Path) -> None:
  """Axes, titles and legends of a perplexity-vs-bits figure (one panel per evaluation set); saves and closes it."""
  import matplotlib.pyplot as plt
  for ax, ds in zip(np.atleast_1d(axes), cfg.eval_sets):
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (linear weights, stored bytes)")
    ax.set_ylabel("perplexity")
    ax.set_title(ds.name)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(cfg: Config = CONFIG, all_windows: bool = False) -> tuple[list[Result], dict[Row, str]]:
  if all_windows:
    cfg = dataclasses.replace(cfg, max_windows=None)
  results, skipped, info = run(cfg)
  text = markdown(cfg, results, skipped, info, all_windows)
  cfg.out_dir.mkdir(parents=True, exist_ok=True)
  md, png = cfg.out_dir / f"{cfg.out_name}.md", cfg.out_dir / f"{cfg.out_name}.png"
  md.write_text(text, encoding="utf-8")
  plot(cfg, results, png)
  print(text)
  print(f"wrote {md} and {png}" + (" (the quick run; --full for the committed table)" if cfg is QUICK else ""))
  return results, skipped


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true", help="every row of the committed table (not the quick rows)")
  parser.add_argument("--all-windows", action="store_true", help="with --full: every window of both sets (no cap)")
  args = parser.parse_args()
  if args.all_windows and not args.full:
    parser.error("--all-windows needs --full")
  compile_cache.enable()
  main(CONFIG if args.full else QUICK, all_windows=args.all_windows)
