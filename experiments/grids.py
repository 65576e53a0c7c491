"""Integer grids measured side by side: which symmetric rule (`SymGrid`), what the clipping search (`ClipSearch`)
buys, and how symmetric grids compare with zero points and float offsets, for RTN and GPTQ (GitHub issue 10).

    python experiments/grids.py                      # stories260K (fp32), ~6 min on 2 cores
    python experiments/grids.py --model smollm2      # SmolLM2-135M-Instruct, output error only (Q4_1 origin: no
                                                     # 4-bit g32 rows), ~10 min

Writes experiments/results/grids_<model>.md and .png.

Protocol: the model, calibration windows and evaluation of experiments/ptq_table.py (its `load`,
`calibration_batches`, `evaluate`), with the caps of `MODELS` below (the first `max_windows` windows of each set).
Per row: one `lb.rtn` / `lb.gptq` call (GPTQ blocksize 128, 1 % dampening, no act-order) with the row's spec; scales
float32 except the float-offset rows (float16 scale and offset, llama.cpp Q4_1's storage). Besides perplexity, the
table reports the summed relative output error of the linear weights on the calibration data,
``sum_w tr(dW^T H dW) / sum_w tr(W^T H W)`` (H the calibration's input second moment; scanned stacks counted per
layer), a direct measure of the weight rounding that does not need an evaluation pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lowbit_jax as lb
from lowbit_jax.eval import Segmentation

try:
  from experiments import ptq_table as pt
except ModuleNotFoundError:  # run as `python experiments/grids.py`
  import ptq_table as pt


class Variant(enum.Enum):
  RESTRICTED = ("sym RESTRICTED (before #10)", dict(grid=lb.SymGrid.RESTRICTED))
  FULL = ("sym FULL", dict(grid=lb.SymGrid.FULL))
  SIGNED_MAX = ("sym SIGNED_MAX", dict(grid=lb.SymGrid.SIGNED_MAX))
  FULL_CLIP = ("sym FULL + clip search", dict(grid=lb.SymGrid.FULL, clip=lb.ClipSearch()))
  SIGNED_MAX_CLIP = ("sym SIGNED_MAX + clip search", dict(grid=lb.SymGrid.SIGNED_MAX, clip=lb.ClipSearch()))
  ASYM = ("asym zero point", dict(symmetric=False))
  ASYM_CLIP = ("asym zero point + clip search", dict(symmetric=False, clip=lb.ClipSearch()))
  FLOAT_OFFSET = ("asym float offset (f16, Q4_1-style)", dict(symmetric=False, zero_point=lb.ZeroPoint.FLOAT,
                                                               scale_dtype=jnp.float16))

  def spec(self, bits: int, group_size: int | None) -> lb.QuantSpec:
    return lb.int_spec(bits, group_size=group_size, **self.value[1])


@dataclasses.dataclass(frozen=True)
class Setting:
  bits: int
  group_size: int | None

  @property
  def label(self) -> str:
    return f"w{self.bits} " + ("per-channel" if self.group_size is None else f"g{self.group_size}")


@dataclasses.dataclass(frozen=True)
class ModelRun:
  name: str
  cfg: pt.Config
  settings: tuple[Setting, ...]
  rtn_variants: tuple[Variant, ...]
  gptq_variants: tuple[Variant, ...]
  gptq_settings: tuple[Setting, ...] | None = None   # None: every setting
  evaluate: bool = True                              # False: the output error only (no evaluation pass)


_ALL = tuple(Variant)
# SmolLM2 has no document-separator BOS convention for plain text (its BOS is <|im_start|>): one BOS per file.
SMOLLM2_EVAL = (pt.EvalSet("TinyStories val (part 1)", "tinystories/tinystories_val_part1.txt",
                           Segmentation.ONE_DOCUMENT, True),
                pt.EvalSet("WikiText-2 test", "wikitext2_raw/wiki.test.raw", Segmentation.ONE_DOCUMENT, False))
_GPTQ = (Variant.RESTRICTED, Variant.FULL, Variant.SIGNED_MAX, Variant.FULL_CLIP, Variant.ASYM, Variant.FLOAT_OFFSET)
MODELS = {
    "stories260k": ModelRun(
        "stories260K", dataclasses.replace(pt.CONFIG, max_windows=24, rows=()),
        (Setting(4, None), Setting(4, 32), Setting(3, 32), Setting(2, 32)), _ALL, _GPTQ),
    "smollm2": ModelRun(
        "SmolLM2-135M-Instruct", dataclasses.replace(
            pt.CONFIG, model="smollm2_135m_instruct_q4_1/SmolLM2-135M-Instruct.Q4_1.gguf", calib_windows=32,
            calib_len=512, calib_batch=4, seq_len=1024, batch_size=2, max_windows=4, rows=(),
            calib_asset="wikitext2_raw/wiki.valid.raw", calib_segmentation=Segmentation.ONE_DOCUMENT,
            eval_sets=SMOLLM2_EVAL),
        (Setting(8, None), Setting(4, None), Setting(4, 128), Setting(3, 128), Setting(2, 64)), _ALL,
        (Variant.RESTRICTED, Variant.FULL, Variant.SIGNED_MAX), gptq_settings=(Setting(3, 128),), evaluate=False),
}


@jax.jit
def _rel_terms(w, d, h):
  """(tr(dW^T H dW), tr(W^T H W)) of one (*B, K, N) weight and (*B, K, K) Hessian."""
  return jnp.einsum("...kn,...kl,...ln->", d, h, d), jnp.einsum("...kn,...kl,...ln->", w, h, w)


def output_error(params, qparams, calib) -> float:
  """sum_w tr(dW^T H dW) / sum_w tr(W^T H W) over the calibrated weights (module docstring)."""
  flat = dict(jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, lb.QArray))[0])
  orig = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  num = den = 0.0
  for path in calib:
    q, wc = flat[path], calib[path]
    if not isinstance(q, lb.QArray) or wc.stats.xtx is None:
      continue
    lay = wc.layout
    w = lay.to_kn(jnp.asarray(orig[path], jnp.float32))                       # (*B, K, N)
    d = lay.to_kn(q.dequantize().astype(jnp.float32)) - w
    h = jnp.reshape(jnp.asarray(wc.stats.xtx, jnp.float32), w.shape[:-2] + (lay.k, lay.k))
    a, b = _rel_terms(w, d, h)
    num, den = num + float(a), den + float(b)
  return num / den


def run(m: ModelRun):
  cfg = m.cfg
  setup = pt.load(cfg)
  if m.evaluate:
    data = [pt.eval_windows(cfg, ds, setup.tokenizer) for ds in cfg.eval_sets]
    cmp = next(i for i, ds in enumerate(cfg.eval_sets) if ds.compare_to_fp32)
    refs = [pt._ref_logits(setup.apply, setup.params, jnp.asarray(data[cmp][0][i:i + cfg.batch_size]))
            for i in range(0, data[cmp][0].shape[0], cfg.batch_size)]
    fp = pt.evaluate(cfg, setup.apply, setup.params, data, refs, "fp")
  else:
    fp = ((np.nan,) * len(cfg.eval_sets), np.nan, np.nan)
  calib = lb.calibrate(setup.apply, setup.params, pt.calibration_batches(cfg, setup.tokenizer))
  qapply = lb.quantized(setup.apply)
  rows = []
  jobs = [(s, v, "RTN") for s in m.settings for v in m.rtn_variants]
  jobs += [(s, v, "GPTQ") for s in (m.gptq_settings or m.settings) for v in m.gptq_variants]
  for s, v, meth in tqdm(jobs, desc=f"{m.name} grids"):
    spec = v.spec(s.bits, s.group_size)
    t0 = time.perf_counter()
    q = lb.rtn(setup.params, calib, spec) if meth == "RTN" else lb.gptq(setup.params, calib, spec,
                                                                                  act_order=False, static_groups=False)
    q = jax.block_until_ready(q)
    secs = time.perf_counter() - t0
    ppl, kl = ((np.nan,) * len(cfg.eval_sets), np.nan) if not m.evaluate else \
        pt.evaluate(cfg, qapply, q, data, refs, f"{meth} {s.label} {v.name}")[:2]
    bits, _ = pt.bits_per_weight(q, setup.linear_paths)
    rows.append(dict(setting=s, variant=v, method=meth, ppl=ppl, kl=kl, err=output_error(setup.params, q, calib),
                     bits=bits, secs=secs))
    tqdm.write(f"{meth:4s} {s.label:14s} {v.value[0]:38s} ppl {' / '.join(f'{p:.4f}' for p in ppl)} "
               f"KL {kl:.5f} err {rows[-1]['err']:.5f} {bits:.3f} b/w")
  return cfg, fp, rows


def markdown(m: ModelRun, cfg, fp, rows, minutes: float) -> str:
  names = [ds.name for ds in cfg.eval_sets]
  lines = [f"# Integer grids on {m.name}", "",
           f"Written by `experiments/grids.py` on {datetime.date.today().isoformat()}, jax {jax.__version__}; "
           f"{minutes:.1f} min. Calibration {cfg.calib_windows} windows of {cfg.calib_len} tokens of "
           f"{cfg.calib_asset}. " + (f"Evaluation: the first {cfg.max_windows} windows of {cfg.seq_len} tokens of "
           f"each set. Unquantized: " + ", ".join(f"{n} {p:.4f}" for n, p in zip(names, fp[0])) + "." if m.evaluate
           else "No evaluation pass (the perplexities of the default grid are in smollm2_table.md): the relative "
           "output error alone ranks the grids."), "",
           "| method | setting | grid | " + " | ".join(f"ppl {n}" for n in names) +
           " | KL to unquantized | rel. output error | bits/weight |",
           "| --- | --- | --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['setting'].label} | {r['variant'].value[0]} | " +
                 " | ".join(f"{p:.4f}" for p in r["ppl"]) + f" | {r['kl']:.5f} | {r['err']:.4g} | {r['bits']:.3f} |")
  lines += ["", "## Protocol (the script's docstring)", "", __doc__.split("Protocol: ", 1)[1].strip(), ""]
  return "\n".join(lines)


def plot(m: ModelRun, cfg, rows, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  for ax, meth in zip(axes, ("RTN", "GPTQ")):
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["method"] == meth))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
      ys = [next((r["ppl"][0] if m.evaluate else r["err"] for r in rows
                  if r["method"] == meth and r["variant"] is v and r["setting"] == s), np.nan) for s in settings]
      ax.bar(np.arange(len(settings)) + j * width, ys, width, label=v.value[0])
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, [s.label for s in settings])
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity, {cfg.eval_sets[0].name}" if m.evaluate else "relative output error")
    ax.set_title(f"{m.name}: {meth}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y", which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(model: str = "stories260k") -> None:
  m = MODELS[model]
  t0 = time.perf_counter()
  cfg, fp, rows = run(m)
  text = markdown(m, cfg, fp, rows, (time.perf_counter() - t0) / 60)
  cfg.out_dir.mkdir(parents=True, exist_ok=True)
  out = cfg.out_dir / f"grids_{model}"
  out.with_suffix(".md").write_text(text, encoding="utf-8")
  plot(m, cfg, rows, out.with_suffix(".png"))
  print(text)
  print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=sorted(MODELS), default="stories260k")
  main(ap.parse_args().model)
