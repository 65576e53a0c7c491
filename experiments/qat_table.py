"""Low bit during training on stories260K (GitHub issue 13, item 5, the stories260K parts).

    python -m experiments.qat_table        # a few minutes on 2 CPU cores

Writes experiments/results/qat_table.md (tables, config, acceptance checks) and qat_table.png (loss curves).

Protocol (fixed seeds, every number from this script):
  * Data: training windows of `seq_len + 1` tokens drawn with `lowbit_jax.eval.sample_windows` from the TinyStories
    training slice (tokenized as experiments/ptq_table.py does), one fresh batch per step; evaluation on the first
    `max_windows` non-overlapping `seq_len` windows of the TinyStories validation file (never trained on).
    Validation perplexity, KL(fp32 || model) and top-1 agreement come from experiments/ptq_table.py's `evaluate`.
  * Part A (pretrained stories260K, scanned layers): RTN-4 PTQ (`SPEC`) vs QAT-4 (`lowbit_jax.qat`, same spec,
    `qat_steps` adamw steps from the pretrained weights, then `rtn` with the QAT analysis) vs QLoRA (`lowbit_jax.lora`
    adapters on an NF4 + double-quant base, `lora_steps` steps). Every quantized row is evaluated packed, through
    `quantized(apply)` or the LoRA function on the packed base.
  * Part B (from scratch, random init, stories260K's architecture): fp32 vs BitNet b1.58 (`lowbit_jax.bitnet`, the
    block linears ternary with int8 activations, head float) vs FP8 delayed scaling (`lowbit_jax.fp8_training`),
    same init, data, schedule and steps; BitNet is then converted to packed ternary QArrays and evaluated through
    `quantized(apply)`.
  * Training runs `jax.lax.scan` over chunks of steps under one `jit`; the curves are the per-step training losses.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lowbit_jax as lb
from experiments import ptq_table as pt
from lowbit_jax import eval as ev
from lowbit_jax.models.llama import Llama


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  spec_name: str = "int4 per-channel (signed-max grid)"
  batch: int = 16
  seq_len: int = 128
  max_windows: int = 32
  eval_batch: int = 8
  qat_steps: int = 100
  qat_lr: float = 3e-5    # from the pretrained weights; 1e-3 over-shot (val ppl 4.73, worse than RTN-4 4.45)
  lora_steps: int = 100
  lora_lr: float = 3e-3
  lora_rank: int = 8
  scratch_steps: int = 300
  scratch_lr: float = 3e-3
  warmup: int = 20
  chunk: int = 25
  seed: int = 0
  out_dir: Path = Path(__file__).resolve().parent / "results"


CONFIG = Config()
SPEC = lb.int_spec(4)
LINEAR = r".*layers.*kernel"    # BitNet: the block linears; the head stays float (lowbit_jax.bitnet docstring)


def xent(logits, tokens):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))


def batches(stream, cfg: Config, steps: int, seed: int) -> jax.Array:
  w = ev.sample_windows(stream, n=steps * cfg.batch, length=cfg.seq_len + 1, batch=cfg.batch, seed=seed)
  return jnp.stack(w)                                                     # (steps, batch, seq_len + 1)


def schedule(lr: float, steps: int, cfg: Config):
  return optax.warmup_cosine_decay_schedule(0.0, lr, min(cfg.warmup, steps // 2), steps, lr * 0.1)


def train(step, carry, data: jax.Array, cfg: Config, label: str):
  """Run `step(carry, batch) -> (carry, loss)` over data (steps, ...) in jitted scans of `chunk` steps."""
  run = jax.jit(lambda c, d: jax.lax.scan(step, c, d))
  losses = []
  for i in tqdm(range(0, data.shape[0], cfg.chunk), desc=label):
    carry, l = run(carry, data[i:i + cfg.chunk])
    losses.append(np.asarray(l))
  return carry, np.concatenate(losses)


def adamw_step(loss_fn, opt):
  """step((params, opt_state), batch) for `loss_fn(params, batch)`."""
  def step(c, t):
    p, o = c
    val, g = jax.value_and_grad(loss_fn)(p, t)
    with jax.numpy_dtype_promotion("standard"):
      u, o = opt.update(g, o, p)
      return (optax.apply_updates(p, u), o), val
  return step


def init_opt(opt, p):
  with jax.numpy_dtype_promotion("standard"):
    return opt.init(p)


def part_a(cfg: Config, setup, train_stream, ecfg, data, refs):
  apply, params = setup.apply, setup.params
  x0 = jnp.asarray(data[0][0][:cfg.eval_batch])
  rows, curves = {}, {}
  rows["fp32"] = pt.evaluate(ecfg, apply, params, data, refs, "fp32")
  an = lb.analyze(apply, params, x0)
  rtn4 = lb.rtn(params, an, SPEC)
  rows["RTN-4 PTQ"] = pt.evaluate(ecfg, lb.quantized(apply), rtn4, data, refs, "RTN-4")
  # QAT-4 from the pretrained weights
  qfn = lb.qat(apply, SPEC)
  opt = optax.adamw(schedule(cfg.qat_lr, cfg.qat_steps, cfg), weight_decay=0.0)
  (p, _), curves["QAT-4 (train loss)"] = train(adamw_step(lambda p, t: xent(qfn(p, t[:, :-1]), t), opt),
                                               (params, init_opt(opt, params)),
                                               batches(train_stream, cfg, cfg.qat_steps, cfg.seed + 1), cfg, "QAT-4")
  qat4 = lb.rtn(p, qfn.analysis(p, x0), SPEC)
  rows["QAT-4 (converted)"] = pt.evaluate(ecfg, lb.quantized(apply), qat4, data, refs, "QAT-4")
  # QLoRA on an NF4 base
  nf4 = lb.nf4_spec()
  base = lb.rtn(params, an, nf4)
  ql = lb.lora(apply, lb.LoraOptions(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank))
  ad0 = ql.init(jax.random.key(cfg.seed), base, an)
  lora_apply = lambda pa, t: ql(pa[0], pa[1], t, train=False)
  rows["NF4 base (QLoRA start)"] = pt.evaluate(ecfg, lora_apply, (base, ad0), data, refs, "NF4")
  opt = optax.adamw(schedule(cfg.lora_lr, cfg.lora_steps, cfg), weight_decay=0.0)
  (ad, _), curves["QLoRA NF4 (train loss)"] = train(
      adamw_step(lambda a, t: xent(ql(base, a, t[:, :-1]), t), opt), (ad0, init_opt(opt, ad0)),
      batches(train_stream, cfg, cfg.lora_steps, cfg.seed + 2), cfg, "QLoRA")
  rows["QLoRA NF4 (after)"] = pt.evaluate(ecfg, lora_apply, (base, ad), data, refs, "QLoRA")
  return rows, curves


def part_b(cfg: Config, conf, train_stream, ecfg, data):
  model = Llama(conf, scan_layers=True)
  apply = lambda p, t: model.apply({"params": p}, t)
  x0 = jnp.asarray(data[0][0][:cfg.eval_batch])
  init = model.init(jax.random.key(cfg.seed + 10), x0)["params"]
  tokens = batches(train_stream, cfg, cfg.scratch_steps, cfg.seed + 3)
  mk = lambda: optax.adamw(schedule(cfg.scratch_lr, cfg.scratch_steps, cfg), weight_decay=0.1)
  rows, curves, finals = {}, {}, {}
  opt = mk()
  (p32, _), curves["fp32"] = train(adamw_step(lambda p, t: xent(apply(p, t[:, :-1]), t), opt),
                                   (init, init_opt(opt, init)), tokens, cfg, "fp32 from scratch")
  rows["fp32"] = pt.evaluate(ecfg, apply, p32, data, None, "fp32")
  bn = lb.bitnet(apply, where=LINEAR)
  opt = mk()
  (pb, _), curves["BitNet b1.58"] = train(adamw_step(lambda p, t: xent(bn(p, t[:, :-1]), t), opt),
                                          (init, init_opt(opt, init)), tokens, cfg, "BitNet from scratch")
  rows["BitNet b1.58 (training forward)"] = pt.evaluate(ecfg, bn, pb, data, None, "BitNet fake")
  qb = lb.rtn(pb, bn.analysis(pb, x0), bn.spec)
  rows["BitNet b1.58 (packed ternary, quantized(apply))"] = pt.evaluate(ecfg, lb.quantized(apply), qb, data, None,
                                                                         "BitNet packed")
  fp8 = lb.fp8_training(apply, lb.Fp8Options(history_len=16))
  vg = lb.fp8_value_and_grad(lambda p, s, t: xent(fp8(p, s, t[:, :-1]), t))
  opt = mk()

  def fp8_step(c, t):
    p, s, o = c
    val, g, s = vg(p, s, t)
    with jax.numpy_dtype_promotion("standard"):
      u, o = opt.update(g, o, p)
      return (optax.apply_updates(p, u), s, o), val

  (p8, s8, _), curves["FP8 (E4M3 fwd, E5M2 grad)"] = train(fp8_step, (init, fp8.init(init, x0), init_opt(opt, init)),
                                                           tokens, cfg, "FP8 from scratch")
  rows["FP8 (E4M3 forward, delayed scaling)"] = pt.evaluate(ecfg, lambda p, t: fp8(p[0], p[1], t), (p8, s8), data,
                                                            None, "FP8")
  rows["FP8-trained weights, f32 forward"] = pt.evaluate(ecfg, apply, p8, data, None, "FP8 f32")
  for k, v in curves.items():
    finals[k] = float(np.mean(v[-20:]))
  return rows, curves, finals


def markdown(cfg: Config, a_rows, b_rows, finals, checks, seconds) -> str:
  out = ["# Low bit during training on stories260K (issue 13, item 5)", "",
         f"Made by `python -m experiments.qat_table` on {datetime.date.today()} ({seconds / 60:.1f} min on the "
         f"2-core CPU). Validation: TinyStories val, first {cfg.max_windows} windows of {cfg.seq_len} tokens.", "",
         f"## A. Pretrained stories260K: RTN-4 PTQ vs QAT-4 vs QLoRA repair of an NF4 base (spec: {cfg.spec_name})", "",
         "| model | val ppl | KL(fp32 ‖ model) | top-1 agreement |", "| --- | --- | --- | --- |"]
  for k, (ppl, kl, top1) in a_rows.items():
    out.append(f"| {k} | {ppl[0]:.4f} | {kl:.5f} | {top1:.4f} |" if k != "fp32" else f"| {k} | {ppl[0]:.4f} | 0 | 1 |")
  out += ["", f"QAT-4: {cfg.qat_steps} adamw steps (peak lr {cfg.qat_lr}, warmup-cosine), batch {cfg.batch} x "
          f"{cfg.seq_len}; QLoRA: rank {cfg.lora_rank}, alpha {2 * cfg.lora_rank}, {cfg.lora_steps} steps (peak lr "
          f"{cfg.lora_lr}), base NF4 block 64 + double quantization, never dequantized.", "",
          f"## B. From scratch (stories260K architecture, random init, {cfg.scratch_steps} steps, batch {cfg.batch} x "
          f"{cfg.seq_len}, adamw peak lr {cfg.scratch_lr}, warmup-cosine, weight decay 0.1)", "",
          "| run | final train loss (mean of last 20 steps) | val ppl |", "| --- | --- | --- |"]
  curve_of = {"fp32": "fp32", "BitNet b1.58 (training forward)": "BitNet b1.58",
              "FP8 (E4M3 forward, delayed scaling)": "FP8 (E4M3 fwd, E5M2 grad)"}
  for k, (ppl, _, _) in b_rows.items():
    c = curve_of.get(k)
    out.append(f"| {k} | {finals[c]:.4f} | {ppl[0]:.3f} |" if c else f"| {k} | | {ppl[0]:.3f} |")
  out += ["", "## Acceptance", ""] + [f"- [{'x' if ok else ' '}] {line}" for line, ok in checks]
  out += ["", "Plot: qat_table.png (training loss per step).", ""]
  return "\n".join(out)


def plot(curves_a, curves_b, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for k, v in curves_a.items():
    axes[0].plot(v, label=k)
  axes[0].set_title("A: QAT-4 / QLoRA from pretrained")
  for k in ("fp32", "BitNet b1.58"):
    axes[1].plot(curves_b[k], label=k)
  axes[1].set_title("B: BitNet b1.58 vs fp32 (from scratch)")
  for k in ("fp32", "FP8 (E4M3 fwd, E5M2 grad)"):
    axes[2].plot(curves_b[k], label=k)
  axes[2].set_title("B: FP8 delayed scaling vs fp32")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats)")
    ax.legend()
  axes[1].set_ylim(top=min(6.5, axes[1].get_ylim()[1]))
  axes[2].set_ylim(top=min(6.5, axes[2].get_ylim()[1]))
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(cfg: Config = CONFIG):
  t0 = time.time()
  setup = pt.load(pt.CONFIG)
  ecfg = dataclasses.replace(pt.CONFIG, eval_sets=(pt.CONFIG.eval_sets[0],), seq_len=cfg.seq_len,
                             batch_size=cfg.eval_batch, max_windows=cfg.max_windows)
  data = [pt.eval_windows(ecfg, ecfg.eval_sets[0], setup.tokenizer)]
  train_stream = pt.token_stream(pt.CONFIG.calib_asset, pt.CONFIG.calib_segmentation, setup.tokenizer)
  refs = [pt._ref_logits(setup.apply, setup.params, jnp.asarray(data[0][0][i:i + cfg.eval_batch]))
          for i in range(0, data[0][0].shape[0], cfg.eval_batch)]
  a_rows, curves_a = part_a(cfg, setup, train_stream, ecfg, data, refs)
  conf = pt.load_gguf(pt.asset_path(pt.CONFIG.model)).config
  ecfg_b = dataclasses.replace(ecfg, eval_sets=(dataclasses.replace(ecfg.eval_sets[0], compare_to_fp32=False),))
  b_rows, curves_b, finals = part_b(cfg, conf, train_stream, ecfg_b, data)
  ppl = lambda rows, k: rows[k][0][0]
  c_b = curves_b["BitNet b1.58"]
  gap = ppl(b_rows, "BitNet b1.58 (packed ternary, quantized(apply))") / ppl(b_rows, "fp32") - 1
  checks = [
      (f"QAT-4 val ppl {ppl(a_rows, 'QAT-4 (converted)'):.4f} < RTN-4 PTQ {ppl(a_rows, 'RTN-4 PTQ'):.4f}",
       ppl(a_rows, "QAT-4 (converted)") < ppl(a_rows, "RTN-4 PTQ")),
      (f"QLoRA lowers val loss from its NF4 start: {math.log(ppl(a_rows, 'NF4 base (QLoRA start)')):.4f} -> "
       f"{math.log(ppl(a_rows, 'QLoRA NF4 (after)')):.4f} nats",
       ppl(a_rows, "QLoRA NF4 (after)") < ppl(a_rows, "NF4 base (QLoRA start)")),
      (f"BitNet trains: train loss {np.mean(c_b[:5]):.3f} (first 5 steps) -> {np.mean(c_b[-20:]):.3f} (last 20); "
       f"val ppl gap to fp32 at equal steps: {100 * gap:+.1f}% (packed ternary vs fp32)",
       np.mean(c_b[-20:]) < np.mean(c_b[:5]) - 1.0),
      (f"FP8 tracks f32: final train loss {finals['FP8 (E4M3 fwd, E5M2 grad)']:.4f} vs {finals['fp32']:.4f} "
       f"({100 * (finals['FP8 (E4M3 fwd, E5M2 grad)'] / finals['fp32'] - 1):+.2f}%)",
       abs(finals["FP8 (E4M3 fwd, E5M2 grad)"] / finals["fp32"] - 1) < 0.03),
  ]
  cfg.out_dir.mkdir(parents=True, exist_ok=True)
  md = markdown(cfg, a_rows, b_rows, finals, checks, time.time() - t0)
  (cfg.out_dir / "qat_table.md").write_text(md, encoding="utf-8")
  plot(curves_a, curves_b, cfg.out_dir / "qat_table.png")
  print(md)
  return a_rows, b_rows, checks


if __name__ == "__main__":
  main()
