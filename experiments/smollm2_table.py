"""Post-training quantization of the real SmolLM2-135M-Instruct (30 layers, dim 576): every method at 8, 4, 3 and 2
bits, greedy chat agreement, mixed precision at equal bytes, and what calibrating and quantizing 135M parameters
costs on this CPU (GitHub issue 10, item 6).

    python experiments/smollm2_table.py                 # every row: ~2 h on 2 cores
    python experiments/smollm2_table.py --part uniform  # the uniform rows (~80 min) -> smollm2_table_uniform.md
    python experiments/smollm2_table.py --part mixed    # the mixed rows beside the uniform GPTQ rows of equal
                                                        # bytes, measured in one run -> smollm2_table_mixed.md
    python experiments/smollm2_table.py --part quick    # a smoke test of every code path (short windows)

Writes experiments/results/smollm2_table[_part].md and .png.

The model's weights are stored by llama.cpp as Q4_1 (4-bit asymmetric, groups of 32); they are dequantized to float32
on load and that float model is the "unquantized" row. Re-quantizing at 4 bits with groups of 32 would be nearly
lossless by construction, so there is no 4-bit g32 row and 4-bit rows say little about method rankings.

Protocol:
  * Calibration: 32 windows of 512 tokens drawn (seed 0) from WikiText-2 *validation* (one document, one BOS), in
    batches of 4; one calibration serves every calibrated row. Its wall time and the process's peak RSS after it
    are reported, then the peak RSS after all rows (ru_maxrss: the whole process, model and evaluation included).
  * Evaluation: the first `max_windows` windows of `seq_len` tokens of WikiText-2 test and of TinyStories val
    (each file one document with one BOS), all positions but the first scored; KL to the unquantized model on the
    TinyStories windows.
  * Greedy agreement: the 32 user questions of experiments/chat_prompts.py rendered with the GGUF's chat template,
    32 new tokens each (no stop token) by `generate_greedy_batch` on the packed weights; reported: the fraction of
    prompts whose 32 tokens equal the unquantized model's, and the mean fraction of identical tokens before the
    first difference.
  * Methods: `experiments/ptq_table.py`'s (RTN / GPTQ / AWQ symmetric on the default grid, SmoothQuant W8A8 alpha
    0.5, LLM.int8() threshold 6, NF4 with double quantization, FP8 E4M3 per tensor); mixed rows: `lb.allocate`
    (default sensitivity) over `MIX_CANDIDATES` at the stored bits/weight of uniform INT3 g128 and INT4 g128,
    applied with GPTQ act-order (static groups), the candidates scored by the output error of GPTQ act-order's
    own result (`allocate(quantizer=...)`), beside uniform GPTQ act-order at those formats in the same run.
    The uniform rows run the layers scanned (one compiled layer); the mixed rows run them unrolled (a second
    calibration of the same windows, one window per batch), so every layer's weights are their own allocation
    units; the KL factors of the default sensitivity are measured on one calibration batch (`kl_batches=1`: 512
    tokens; one forward of the 30-layer model per unit, 120 units).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import functools
import resource
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lowbit_jax as lb
from lowbit_jax import select as sel
from lowbit_jax.assets import asset_path
from lowbit_jax.eval import CachedApply, Segmentation, generate_greedy_batch
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama

try:
  from experiments import ptq_table as pt
  from experiments.chat_prompts import QUESTIONS
except ModuleNotFoundError:  # run as `python experiments/smollm2_table.py`
  import ptq_table as pt
  from chat_prompts import QUESTIONS

M = pt.Method
SETTINGS = ((8, None), (4, None), (4, 128), (3, 128), (2, 64))
ROWS = tuple(pt.Row(m, b, g) for m in (M.RTN, M.GPTQ, M.AWQ) for b, g in SETTINGS) + (
    pt.Row(M.NF4), pt.Row(M.FP8), pt.Row(M.SMOOTHQUANT), pt.Row(M.LLM_INT8))
QUICK = (pt.Row(M.RTN, 8, None), pt.Row(M.GPTQ, 3, 128))
MIX_CANDIDATES = (lb.int_spec(2, group_size=64), lb.int_spec(3, group_size=128), lb.int_spec(4, group_size=128),
                  lb.int_spec(8))
MIX_GPTQ = dict(act_order=True, static_groups=True)   # the mixed rows' GPTQ: without act-order, GPTQ is worse than
#   RTN end to end on this model although its per-layer output error is 2-5x lower (see the README); with it, better
MIX_AT = ((3, 128), (4, 128))  # mixed rows at the stored bits/weight of these uniform formats (not INT2 g64:
#                                 no candidate is cheaper, so an allocation at its bytes is uniform INT2 g64)
NEW_TOKENS = 32

CONFIG = dataclasses.replace(
    pt.CONFIG, model="smollm2_135m_instruct_q4_1/SmolLM2-135M-Instruct.Q4_1.gguf", scan_layers=True,
    calib_asset="wikitext2_raw/wiki.valid.raw", calib_segmentation=Segmentation.ONE_DOCUMENT, calib_windows=32,
    calib_len=512, calib_batch=4,
    eval_sets=(pt.EvalSet("WikiText-2 test", "wikitext2_raw/wiki.test.raw", Segmentation.ONE_DOCUMENT, False),
               pt.EvalSet("TinyStories val (part 1)", "tinystories/tinystories_val_part1.txt",
                          Segmentation.ONE_DOCUMENT, True)),
    seq_len=2048, batch_size=1, max_windows=1, rows=ROWS,
    out_dir=Path(__file__).resolve().parent / "results")


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def agreement(outs, ref) -> tuple[float, float]:
  """(fraction of prompts with all tokens equal, mean fraction of tokens before the first difference)."""
  same, prefix = [], []
  for a, b in zip(outs, ref):
    diff = np.flatnonzero(a != b)
    same.append(diff.size == 0)
    prefix.append((diff[0] if diff.size else len(b)) / len(b))
  return float(np.mean(same)), float(np.mean(prefix))


def run(cfg, rows, mix_at, report=lambda results, info: None):
  """-> (results, info); `report(results, info)` after every row, so a stopped run leaves its finished rows."""
  t_start = time.perf_counter()
  setup = pt.load(cfg)
  loaded = load_gguf(asset_path(cfg.model))
  loaded = dataclasses.replace(loaded, params=lb.dequantize(loaded.params))   # the float view of Q4_1 / Q8_0
  model = Llama(loaded.config, scan_layers=cfg.scan_layers)
  prompts = [loaded.tokenizer.encode(loaded.chat_template.apply_chat_template([{"role": "user", "content": q}]))
             for q in QUESTIONS]
  data = [pt.eval_windows(cfg, ds, setup.tokenizer) for ds in cfg.eval_sets]
  cmp = next(i for i, ds in enumerate(cfg.eval_sets) if ds.compare_to_fp32)
  refs = [pt._ref_logits(setup.apply, setup.params, jnp.asarray(data[cmp][0][i:i + cfg.batch_size]))
          for i in range(0, data[cmp][0].shape[0], cfg.batch_size)]
  info = dict(windows=[n for _, n in data], load_rss=_rss_mib(), calib_seconds=float("nan"), calib_rss=float("nan"))
  calib = None
  if any(r.method.calibrated for r in rows):
    t0 = time.perf_counter()
    calib = lb.calibrate(setup.apply, setup.params, pt.calibration_batches(cfg, setup.tokenizer),
                         outlier_threshold=cfg.llm_int8_threshold)
    info.update(calib_seconds=time.perf_counter() - t0, calib_rss=_rss_mib())
  ref_out = generate_greedy_batch(model, setup.params, prompts, max_new_tokens=NEW_TOKENS,
                                  apply_fn=CachedApply(model=model))
  fns = (lb.quantized(setup.apply), model, lb.quantized(CachedApply(model=model)))   # one object each: jit caches
  results = []

  def measure(label, tree, seconds, method, fns=fns, linear=setup.linear_paths):
    fn, gen_model, gen = fns
    ppl, kl, top1 = pt.evaluate(cfg, fn, tree, data, refs, label)
    outs = generate_greedy_batch(gen_model, tree, prompts, max_new_tokens=NEW_TOKENS, apply_fn=gen)
    bits, _ = pt.bits_per_weight(tree, linear)
    results.append(dict(label=label, method=method, ppl=ppl, kl=kl, top1=top1, agree=agreement(outs, ref_out),
                        bits=bits, secs=seconds))
    info.update(total_minutes=(time.perf_counter() - t_start) / 60, peak_rss=_rss_mib())
    report(results, info)
    tqdm.write(f"{label:34s} ppl {' / '.join(f'{p:.3f}' for p in ppl)} KL {kl:.4f} agree "
               f"{results[-1]['agree'][0]:.2f}/{results[-1]['agree'][1]:.2f} {bits:.3f} b/w {seconds:.0f} s")
    return bits

  measure("unquantized (Q4_1 dequantized, f32)", setup.params, 0.0, None,
          (setup.apply, model, CachedApply(model=model)))
  if mix_at:   # first: the unrolled calibration and the allocation are the run's least tried part
    flat_model = Llama(loaded.config, scan_layers=False)
    flat_apply = lambda p, t: flat_model.apply({"params": p}, t)  # noqa: E731
    flat_fns = (lb.quantized(flat_apply), flat_model, lb.quantized(CachedApply(model=flat_model)))
    flat_linear = frozenset(sel.path_str(p) for p in sel.select(loaded.params))   # layers_{i}/... paths
    t0 = time.perf_counter()
    flat_calib = lb.calibrate(flat_apply, loaded.params,   # the same windows one per batch: one KL batch is 512
                              pt.calibration_batches(dataclasses.replace(cfg, calib_batch=1), setup.tokenizer))
    info.update(flat_calib_seconds=time.perf_counter() - t0, flat_calib_rss=_rss_mib())
    alloc = None
    for bits, group in mix_at:   # the budget: the stored bits/weight of the uniform format (GPTQ's = RTN's)
      budget, _ = pt.bits_per_weight(lb.rtn(setup.params, None, lb.int_spec(bits, group_size=group)),
                                     setup.linear_paths)
      t0 = time.perf_counter()
      alloc = (lb.allocate(loaded.params, flat_calib, budget, MIX_CANDIDATES, kl_batches=1,
                           quantizer=functools.partial(lb.gptq, **MIX_GPTQ)) if alloc is None
               else alloc.with_budget(budget))
      tree = jax.block_until_ready(alloc.apply(lb.gptq, loaded.params, flat_calib, options=MIX_GPTQ))
      info.setdefault("allocations", []).append((budget, alloc.table()))
      measure(f"GPTQ act-order mixed @ {budget:.3f} b/w (INT{bits} g{group}'s bytes)", tree, time.perf_counter() - t0,
              "mixed", flat_fns, flat_linear)
      del tree
    del flat_calib
  for row in tqdm(rows, desc="SmolLM2 rows"):
    try:
      t0 = time.perf_counter()
      tree = jax.block_until_ready(pt.quantize_row(cfg, row, setup.params, calib))
      measure(row.label, tree, time.perf_counter() - t0, row.method)
      del tree
    except Exception as e:  # a row that cannot run is reported, never estimated
      info.setdefault("skipped", []).append(f"{row.label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
      tqdm.write(f"{row.label}: SKIPPED\n{traceback.format_exc(limit=6)}")
  info.update(total_minutes=(time.perf_counter() - t_start) / 60, peak_rss=_rss_mib(), done=True)
  report(results, info)
  return results, info


PARTIAL = " so far (the run was stopped or is still running: only the rows below were measured)"


def markdown(cfg, results, info) -> str:
  names = [ds.name for ds in cfg.eval_sets]
  lines = [
      "# Post-training quantization of SmolLM2-135M-Instruct", "",
      f"Written by `experiments/smollm2_table.py` on {datetime.date.today().isoformat()}, jax {jax.__version__} on "
      f"{jax.devices()[0].platform}; {info['total_minutes']:.1f} min{'' if info.get('done') else PARTIAL}. "
      f"Evaluation: the first "
      f"{cfg.max_windows} windows of {cfg.seq_len} tokens of each set ("
      + ", ".join(f"{n}: {w} windows" for n, w in zip(names, info["windows"]))
      + f"). Calibration: {cfg.calib_windows} x {cfg.calib_len} WikiText-2 validation tokens"
      + "".join(f"; {what} {info[k + '_seconds']:.1f} s, peak RSS after it {info[k + '_rss']:.0f} MiB"
                for k, what in (("calib", "scanned layers (uniform rows)"), ("flat_calib", "unrolled (mixed rows)"))
                if k + "_seconds" in info and info[k + "_seconds"] == info[k + "_seconds"])
      + f". Peak RSS {info['load_rss']:.0f} MiB after loading, {info['peak_rss']:.0f} MiB at the end. Greedy "
      f"agreement: 32 chat prompts x {NEW_TOKENS} new tokens.", "",
      "| method | " + " | ".join(f"ppl {n}" for n in names) +
      " | KL to unquantized | top-1 | prompts identical | tokens before 1st diff | bits/weight (linear) | "
      "quant time (s) |",
      "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in sorted(results, key=lambda r: r["method"] == "mixed"):   # mixed rows (measured first) last
    lines.append(f"| {r['label']} | " + " | ".join(f"{p:.4f}" for p in r["ppl"]) +
                 f" | {r['kl']:.5f} | {100 * r['top1']:.2f} % | {100 * r['agree'][0]:.0f} % | "
                 f"{100 * r['agree'][1]:.0f} % | {r['bits']:.3f} | {r['secs']:.1f} |")
  if info.get("skipped"):
    lines += ["", "Rows that could not run (no number is estimated):", ""] + [f"* {s}" for s in info["skipped"]]
  for budget, t in info.get("allocations", []):
    lines += ["", f"<details><summary>Allocation at {budget:.3f} bits/weight</summary>", "", t, "", "</details>"]
  lines += ["", "## Protocol (the script's docstring)", "", __doc__.split("Protocol:\n", 1)[1].rstrip(), ""]
  return "\n".join(lines)


def plot(cfg, results, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(cfg.eval_sets), figsize=(6.5 * len(cfg.eval_sets), 4.8))
  for i, (ax, ds) in enumerate(zip(np.atleast_1d(axes), cfg.eval_sets)):
    ax.axhline(results[0]["ppl"][i], color="k", ls="--", lw=1, label=f"unquantized ({results[0]['ppl'][i]:.2f})")
    for method in dict.fromkeys(r["method"] for r in results[1:]):
      pts = [r for r in results[1:] if r["method"] == method]
      ax.scatter([r["bits"] for r in pts], [r["ppl"][i] for r in pts], s=40, alpha=0.8,
                 label=getattr(method, "value", method))
  pt.finish_ppl_plot(fig, axes, cfg, "SmolLM2-135M-Instruct PTQ: perplexity vs bits per weight", path)


class Part(enum.Enum):
  """Which rows one run measures (the uniform rows take ~80 min on a 2-core CPU, the mixed ones ~30 min)."""
  ALL = "all"
  UNIFORM = "uniform"
  MIXED = "mixed"
  QUICK = "quick"   # a smoke test of every code path: 2 rows and one mixed row on short windows


def main(part: Part = Part.ALL) -> None:
  cfg = CONFIG
  cfg.out_dir.mkdir(parents=True, exist_ok=True)
  out = cfg.out_dir / ("smollm2_table" if part is Part.ALL else f"smollm2_table_{part.value}")

  def report(results, info):
    out.with_suffix(".md").write_text(markdown(cfg, results, info), encoding="utf-8")
    plot(cfg, results, out.with_suffix(".png"))

  at_mix = tuple(pt.Row(M.GPTQ, b, g, act_order=True) for b, g in MIX_AT)   # the uniform rows the mixed ones are
  #                                            compared with (GPTQ without act-order: experiments/gptq_order.py)
  rows = {Part.ALL: cfg.rows, Part.UNIFORM: cfg.rows, Part.MIXED: at_mix, Part.QUICK: QUICK}[part]
  mix_at = {Part.ALL: MIX_AT, Part.UNIFORM: (), Part.MIXED: MIX_AT, Part.QUICK: MIX_AT[:1]}[part]
  if part is Part.QUICK:
    cfg = dataclasses.replace(cfg, calib_windows=8, calib_len=256, seq_len=512)
  results, info = run(cfg, rows, mix_at, report=report)
  print(markdown(cfg, results, info))
  print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--part", type=Part, choices=list(Part), default=Part.ALL,
                  help="which rows: all (one table), uniform or mixed (tables of their own), quick (a smoke test)")
  main(ap.parse_args().part)
